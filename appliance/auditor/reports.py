"""Compliance reports built from the audit log and the catalogue, as JSON, CSV, HTML or PDF.

A report answers, for a time range: who put which data in, what personal
data it held and what was done with it, which models were trained on it, who
used those models and how much, who was refused, when keys rotated, what was
deleted and why (a user's request, a retention period, a withdrawal; with the
crypto-shred evidence), and whether the log's hash chain
verifies. It is built from metadata only: counts by entity type, ids and
hashes, never a scanned value, prompt or response.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from markupsafe import Markup, escape

from appliance import __version__
from appliance.audit.checkpoints import latest_checkpoint
from appliance.audit.service import AuditContext, events_between, record, verify_chain
from appliance.catalog.service import CatalogService
from appliance.db.base import Database, utcnow
from appliance.errors import InvalidRequestError
from appliance.files.service import FileService
from appliance.identity.service import all_projects

if TYPE_CHECKING:
    from appliance.audit.models import AuditEvent

Format = Literal["json", "csv", "html", "pdf"]
FORMATS = ("json", "csv", "html", "pdf")
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv", "html": "text/html", "pdf": "application/pdf"}
_DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
_DEJAVU_BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


@dataclass(frozen=True)
class ReportScope:
    since: datetime
    until: datetime
    project: str | None = None  # None: every project


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def build_report(db: Database, scope: ReportScope) -> dict[str, Any]:
    """The report as a JSON-ready dict (the other formats render it)."""
    if scope.until <= scope.since:
        raise InvalidRequestError("`to` must be after `from`", param="to")
    with db.read() as s:
        events = events_between(s, scope.since, scope.until, scope.project)
        projects = {p.id: p.name for p in all_projects(s)}
        pid = next((i for i, n in projects.items() if n == scope.project), -1) if scope.project else None
        files = FileService.created_before(s, scope.until, pid)
        adapters = CatalogService.created_before(s, scope.until, pid)
        checkpoint = latest_checkpoint(s)

    by_resource: dict[tuple[str | None, str | None], list[AuditEvent]] = defaultdict(list)
    for e in events:
        by_resource[(e.resource_type, e.resource_id)].append(e)

    def readers(file_id: str, action: str = "file.read_content") -> list[dict[str, Any]]:
        counts: Counter[str] = Counter(e.actor for e in by_resource[("file", file_id)] if e.action == action)
        return [{"actor": a, "reads": n} for a, n in sorted(counts.items())]

    datasets = []
    for f in files:
        upload = next((e for e in by_resource[("file", f.id)] if e.action == "file.upload"), None)
        deletion = next((e for e in by_resource[("file", f.id)] if e.action == "file.delete"), None)
        summary = f.scan_summary or {}
        datasets.append({
            "id": f.id, "project": projects.get(f.project_id), "filename": f.filename, "purpose": f.purpose,
            "uploaded_by": f.created_by, "uploaded_at": _iso(f.created_at), "records": f.records,
            "content_sha256": f.content_sha256, "policy_hash": f.policy_hash, "decision": f.decision,
            "pii_by_type": summary.get("by_entity_type") or {}, "actions": summary.get("by_action") or {},
            "redacted_records": summary.get("redacted_records", 0), "content_read_by": readers(f.id),
            "values_revealed_to": readers(f.id, "file.scan_reveal"), "revision": f.revision,
            "rescans": [{"seq": e.seq, "at": _iso(e.ts), "actor": e.actor, "outcome": e.outcome,
                         "policy_hash": (e.details or {}).get("policy_hash"),
                         "previous_policy_hash": ((e.details or {}).get("previous") or {}).get("policy_hash")}
                        for e in by_resource[("file", f.id)] if e.action == "file.rescan"],
            "upload_audit_seq": upload.seq if upload else None,
            "deleted_at": _iso(f.deleted_at), "deleted_by": deletion.actor if deletion else None,
        })
    rejected = [{"seq": e.seq, "at": _iso(e.ts), "actor": e.actor, "project": e.project, "outcome": e.outcome,
                 "code": (e.details or {}).get("code"), "param": (e.details or {}).get("param"),
                 "blocked_types": sorted(((e.details or {}).get("blocked_lines") or {}).keys())}
                for e in events if e.action == "file.reject"]

    usage: dict[str, Counter[str]] = defaultdict(Counter)
    tokens: dict[str, int] = defaultdict(int)
    for e in events:
        if e.action in ("inference.chat", "inference.completion") and e.resource_id:
            usage[e.resource_id][e.actor] += 1
            tokens[e.resource_id] += int((e.details or {}).get("total_tokens") or 0)
    models = []
    for a in adapters:
        m = a.manifest or {}
        models.append({
            "id": a.id, "project": projects.get(a.project_id), "kind": a.kind, "job_id": a.job_id,
            "base_model": m.get("base_model"), "datasets": m.get("datasets"), "hyperparameters": m.get("hyperparameters"),
            "metrics": m.get("metrics"), "trained_by": m.get("trained_by"), "published_at": _iso(a.created_at),
            "privacy": _privacy_summary(m.get("privacy")),
            "manifest_signature": a.signature, "deleted_at": _iso(a.deleted_at),
            "queries": [{"actor": k, "requests": n} for k, n in sorted(usage[a.id].items())],
            "query_tokens": tokens[a.id],
        })
    denials = [{"seq": e.seq, "at": _iso(e.ts), "actor": e.actor, "action": e.action, "resource": e.resource_id,
                "project": e.project, "reason": e.reason, "origin_ip": e.origin_ip}
               for e in events if e.outcome == "denied"]
    rotations = [{"seq": e.seq, "at": _iso(e.ts), "actor": e.actor, "new_kek": e.resource_id,
                  "rewrapped": (e.details or {}).get("rewrapped"),
                  "previous_keks": (e.details or {}).get("previous_kek_ids")}
                 for e in events if e.action == "keys.rotate"]
    deletions = [{"seq": e.seq, "at": _iso(e.ts), "actor": e.actor, "what": e.resource_type, "id": e.resource_id,
                  "project": e.project, "reason": _deletion_reason(e),
                  "crypto_shred": (e.details or {}).get("crypto_shred")}
                 for e in events if e.action in ("file.delete", "adapter.delete")]
    glossary = [{"seq": e.seq, "at": _iso(e.ts), "actor": e.actor, "project": e.project,
                 "change": e.action.removeprefix("glossary."),
                 "values": (e.details or {}).get("added") or (e.details or {}).get("removed"),
                 "from_file": (e.details or {}).get("file_id"), "entries": (e.details or {}).get("entries"),
                 "content_hash": (e.details or {}).get("content_hash")}
                for e in events if e.action in ("glossary.add", "glossary.remove")]
    chain = verify_chain(db)
    return {
        "format": "appliance-audit-report/1",
        "generated_at": utcnow().isoformat(), "code_version": __version__,
        "scope": {"from": scope.since.isoformat(), "to": scope.until.isoformat(), "project": scope.project},
        "summary": {"events": len(events), "datasets": len(datasets), "rejected_uploads": len(rejected),
                    "models": len(models), "denials": len(denials), "key_rotations": len(rotations),
                    "deletions": len(deletions), "glossary_changes": len(glossary)},
        "datasets": datasets, "rejected_uploads": rejected, "glossary_changes": glossary, "models": models,
        "access_denials": denials,
        "key_rotations": rotations, "deletions": deletions,
        "chain": {"ok": chain.ok, "events": chain.events, "head_seq": chain.head_seq, "bad_seq": chain.bad_seq,
                  "problem": chain.problem,
                  "latest_checkpoint": ({"tree_size": checkpoint.tree_size, "root_hash": checkpoint.root_hash,
                                         "at": _iso(checkpoint.created_at)} if checkpoint else None)},
    }


def _deletion_reason(event: AuditEvent) -> str:
    """Why something was deleted: ``request`` (a user's), ``retention (90d, policy sha256:...)``, or a withdrawal."""
    details = event.details or {}
    if details.get("reason") == "retention":
        return f"retention ({details.get('retention_period')}, policy {details.get('policy_hash')})"
    return event.reason or "request"


def _privacy_summary(privacy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The memorisation evidence of a manifest in a few figures (canary exposure, extraction, DP)."""
    if not privacy:
        return None
    out: dict[str, Any] = {}
    if canaries := privacy.get("canaries"):
        out["canaries"] = canaries.get("count")
        out["canary_exposure_bits"] = _round(canaries.get("mean_exposure"))
        out["canary_exposure_base_model_bits"] = _round(canaries.get("mean_exposure_base"))
    if extraction := privacy.get("extraction"):
        out["extraction_probe"] = (f"not run: {extraction['not_run']}" if extraction.get("not_run") else
                                   f"{extraction.get('extracted')} of {extraction.get('probed')} allowed values completed")
    if dp := privacy.get("dp"):
        out["dp_epsilon_spent"] = _round(dp.get("epsilon_spent"))
        out["dp_delta"] = dp.get("delta")
    if isolation := privacy.get("worker_isolation"):
        out["worker_isolation"] = f"{isolation.get('level')} ({isolation.get('executor')} executor)"
        if ranks := isolation.get("ranks"):  # a Ray job: where each rank's worker ran, as it reported
            out["worker_isolation"] += "; " + ", ".join(
                f"rank {r.get('rank')}: {r.get('level')}, {r.get('network')} network" for r in ranks)
    return out or None


def _round(value: Any) -> Any:
    return round(value, 2) if isinstance(value, float) else value


# -- rendering ---------------------------------------------------------------
def _cell(value: Any) -> str:
    """A value in one CSV cell: nested values as compact JSON (machine-readable)."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def _label(key: Any) -> str:
    """A field name for readers (``query_tokens`` -> ``query tokens``); entity types (``EMAIL_ADDRESS``) stay."""
    key = str(key)
    return key.replace("_", " ") if key.islower() else key


def _plain(value: Any) -> str:
    """A value as a reader would write it: ``key: value; ...`` for mappings, lists joined, yes/no for booleans."""
    if value is None or value == "" or value == [] or value == {}:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{_label(k)}: {_plain(v)}" for k, v in value.items()
                         if _plain(v) != "")
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return " | ".join(_plain(v) for v in value)
        return ", ".join(_plain(v) for v in value)
    return str(value)


def _html(value: Any) -> Markup:
    """A value as HTML for the report: a definition list for mappings, a list for lists of records."""
    if isinstance(value, dict) and value:
        items = "".join(f"<dt>{escape(_label(k))}</dt><dd>{_html(v)}</dd>" for k, v in value.items()
                        if _plain(v) != "")
        return Markup(f'<dl class="kv">{items}</dl>')
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return Markup("<ul>" + "".join(f"<li>{escape(_plain(v))}</li>" for v in value) + "</ul>")
    return Markup(escape(_plain(value)))


#: What each section holds, in a sentence, for the reader of the HTML and PDF documents.
SECTION_NOTES = {
    "datasets": "Every dataset uploaded by the end of the period: what the scan found per type, what the policy "
                "did with it, who read its content or had its values revealed, re-scans and deletion.",
    "rejected_uploads": "Uploads the policy refused (nothing of them was kept).",
    "glossary_changes": "Values a data owner marked as not personal data, and removals.",
    "models": "Every fine-tuned model: its base model, the datasets it was trained on (lineage, with their "
              "content hashes), hyperparameters, evaluation and memorisation figures, who queried it.",
    "access_denials": "Requests refused for lack of a role, project or permission, and failed log-ins.",
    "key_rotations": "Rotations of the key-encryption key and how many data keys were re-wrapped.",
    "deletions": "Files and models deleted, by whom and why; crypto-shredding destroys their keys.",
}

SECTIONS = [
    ("datasets", "Datasets", ["id", "project", "filename", "uploaded_by", "uploaded_at", "records", "decision",
                              "pii_by_type", "actions", "redacted_records", "policy_hash", "revision", "rescans",
                              "content_read_by", "values_revealed_to", "deleted_at", "deleted_by"]),
    ("rejected_uploads", "Rejected uploads", ["seq", "at", "actor", "project", "outcome", "code", "param",
                                              "blocked_types"]),
    ("glossary_changes", "Glossary changes (values marked as not personal data)",
     ["seq", "at", "actor", "project", "change", "values", "from_file", "entries", "content_hash"]),
    ("models", "Models and their lineage", ["id", "project", "kind", "base_model", "datasets", "trained_by",
                                            "published_at", "hyperparameters", "metrics", "privacy", "queries",
                                            "query_tokens",
                                            "deleted_at"]),
    ("access_denials", "Access denials", ["seq", "at", "actor", "action", "resource", "project", "reason",
                                          "origin_ip"]),
    ("key_rotations", "Key rotations", ["seq", "at", "actor", "new_kek", "rewrapped", "previous_keks"]),
    ("deletions", "Deletions (crypto-shredding)", ["seq", "at", "actor", "what", "id", "project", "reason",
                                                   "crypto_shred"]),
]


def render_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["section", "field", "value"])
    for k, v in report["scope"].items():
        w.writerow(["scope", k, _cell(v)])
    for k, v in report["chain"].items():
        w.writerow(["chain", k, _cell(v)])
    for key, _, columns in SECTIONS:
        w.writerow([])
        w.writerow(["section", *columns])
        for row in report[key]:
            w.writerow([key, *(_cell(row.get(c)) for c in columns)])
    return buf.getvalue()


def _environment():
    from jinja2 import Environment, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True))
    env.filters["html"] = _html
    return env


def render_html_body(report: dict[str, Any]) -> Markup:
    """The report's content (headings, chain status, summary, one table per section), to embed in a page."""
    return Markup(_environment().from_string(_BODY).render(r=report, sections=SECTIONS, notes=SECTION_NOTES))


def render_html(report: dict[str, Any]) -> str:
    """The report as a standalone HTML document (printable)."""
    return _environment().from_string(_HTML).render(r=report, body=render_html_body(report))


def render_pdf(report: dict[str, Any]) -> bytes:
    """A PDF document with real text (selectable, extractable): the chain status and summary, then per section a
    short note and, per entry, a two-column table of its fields."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    pdf = FPDF(orientation="P", format="A4")
    pdf.set_auto_page_break(True, margin=14)
    pdf.set_margins(14, 14, 14)
    family = "Helvetica"
    if _DEJAVU.exists():
        pdf.add_font("DejaVu", "", str(_DEJAVU))
        if _DEJAVU_BOLD.exists():
            pdf.add_font("DejaVu", "B", str(_DEJAVU_BOLD))
        family = "DejaVu"
    bold = "B" if family == "Helvetica" or _DEJAVU_BOLD.exists() else ""

    def text(value: str) -> str:
        return value if family == "DejaVu" else value.encode("latin-1", "replace").decode("latin-1")

    def pairs(rows: list[tuple[str, str]], widths: tuple[int, int] = (48, 134)) -> None:
        pdf.set_font(family, size=8)
        with pdf.table(col_widths=widths, first_row_as_headings=False, text_align="LEFT", line_height=4.2,
                       padding=1.2) as table:
            for key, value in rows:
                row = table.row()
                row.cell(text(key), style=FontFace(emphasis=bold or None))
                row.cell(text(value))
        pdf.ln(2)

    pdf.add_page()
    pdf.set_font(family, bold, size=18)
    pdf.cell(0, 10, text("Appliance audit report"), new_x="LMARGIN", new_y="NEXT")
    scope, chain = report["scope"], report["chain"]
    checkpoint = chain.get("latest_checkpoint")
    pairs([("Period", f"{scope['from']} to {scope['to']}"), ("Project", scope["project"] or "all projects"),
           ("Generated", f"{report['generated_at']} by appliance {report['code_version']}"),
           ("Hash chain", ("verified" if chain["ok"] else f"BROKEN at seq {chain['bad_seq']}: {chain['problem']}")
            + f" ({chain['events']} events, head {chain['head_seq']})"),
           ("Signed checkpoint", f"{checkpoint['tree_size']} events at {checkpoint['at']}, root "
                                 f"{checkpoint['root_hash']}" if checkpoint else "none yet")])
    pdf.set_font(family, bold, size=12)
    pdf.cell(0, 8, text("Summary"), new_x="LMARGIN", new_y="NEXT")
    pairs([(k.replace("_", " "), str(v)) for k, v in report["summary"].items()])
    for key, title, columns in SECTIONS:
        pdf.ln(2)
        pdf.set_font(family, bold, size=13)
        pdf.cell(0, 8, text(f"{title} ({len(report[key])})"), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(family, size=8)
        pdf.multi_cell(0, 4, text(SECTION_NOTES[key]), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1)
        if not report[key]:
            pdf.cell(0, 5, text("None in this period."), new_x="LMARGIN", new_y="NEXT")
            continue
        for row in report[key]:
            pairs([(c.replace("_", " "), _plain(row.get(c))) for c in columns if _plain(row.get(c)) != ""])
    return bytes(pdf.output())


def render(report: dict[str, Any], fmt: Format) -> bytes:
    if fmt == "json":
        return json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False).encode()
    if fmt == "csv":
        return render_csv(report).encode()
    if fmt == "html":
        return render_html(report).encode()
    if fmt == "pdf":
        return render_pdf(report)
    raise InvalidRequestError(f"`format` must be one of {', '.join(FORMATS)}; got {fmt!r}", param="format")


def produce(db: Database, ctx: AuditContext, scope: ReportScope, fmt: str) -> bytes:
    """Build, render and audit a report (reading the log is itself audited)."""
    if fmt not in FORMATS:
        raise InvalidRequestError(f"`format` must be one of {', '.join(FORMATS)}; got {fmt!r}", param="format")
    body = render(build_report(db, scope), fmt)  # type: ignore[arg-type]
    _audit_report(db, ctx, scope, fmt, len(body))
    return body


def produce_page(db: Database, ctx: AuditContext, scope: ReportScope) -> Markup:
    """The report's HTML content for a portal page (the session's report), built and audited as :func:`produce`."""
    body = render_html_body(build_report(db, scope))
    _audit_report(db, ctx, scope, "html", len(body))
    return body


def _audit_report(db: Database, ctx: AuditContext, scope: ReportScope, fmt: str, size: int) -> None:
    with db.transaction() as s:
        record(s, ctx, "audit.report", resource_type="audit_log", project=scope.project,
               details={"from": scope.since.isoformat(), "to": scope.until.isoformat(), "format": fmt,
                        "bytes": size})


_BODY = """<h1>Appliance audit report</h1>
<p>Period {{ r.scope.from }} to {{ r.scope.to }} · project {{ r.scope.project or "all" }} ·
generated {{ r.generated_at }} by appliance {{ r.code_version }}</p>
<p id="chain-status">Hash chain: {% if r.chain.ok %}<strong class="ok">verified</strong>{% else %}<strong class="bad">BROKEN at
seq {{ r.chain.bad_seq }}</strong>: {{ r.chain.problem }}{% endif %} ({{ r.chain.events }} events, head
{{ r.chain.head_seq }}){% if r.chain.latest_checkpoint %} · latest signed checkpoint: {{ r.chain.latest_checkpoint.tree_size }}
events at {{ r.chain.latest_checkpoint.at }}{% endif %}</p>
<nav aria-label="Sections"><ul class="toc">{% for key, title, columns in sections %}<li><a href="#{{ key }}">{{ title }}</a>
 ({{ r[key] | length }})</li>{% endfor %}</ul></nav>
<table class="summary"><tbody>{% for k, v in r.summary.items() %}<tr><th scope="row">{{ k.replace("_", " ") }}</th><td>{{ v }}</td></tr>{% endfor %}</tbody></table>
{% for key, title, columns in sections %}
<section id="{{ key }}"><h2>{{ title }} ({{ r[key] | length }})</h2>
<p class="muted">{{ notes[key] }}</p>
{% if r[key] %}<div class="table-scroll"><table><thead><tr>{% for c in columns %}<th scope="col">{{ c.replace("_", " ") }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in r[key] %}<tr>{% for c in columns %}<td>{{ row.get(c) | html }}</td>{% endfor %}</tr>{% endfor %}</tbody></table></div>
{% else %}<p>None in this period.</p>{% endif %}</section>
{% endfor %}
"""

_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Audit report {{ r.scope.from }} to {{ r.scope.to }}</title>
<style>body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1f24}table{border-collapse:collapse;width:100%;
margin:8px 0 20px}th,td{border:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top;font-size:12px}
th{background:#f6f8fa}.bad{color:#cf222e}.ok{color:#1a7f37}.muted{color:#57606a}dl.kv{margin:0}
dl.kv dt{font-weight:600;float:left;clear:left;margin-right:4px}dl.kv dt::after{content:":"}dl.kv dd{margin:0}
ul{margin:0;padding-left:16px}.table-scroll{overflow-x:auto}@media print{.toc{display:none}section{break-inside:auto}}</style>
</head><body>
{{ body }}
</body></html>
"""


def parse_when(value: str, param: str) -> datetime:
    """A report period's bound as the CLI and the API both take it: a date (midnight UTC) or an ISO
    8601 / RFC 3339 date-time (UTC when it has no offset).

    Raises:
        InvalidRequestError: naming ``param`` (``from``/``to``, or the CLI's ``--from``/``--to``).
    """
    try:
        ts = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidRequestError(f"`{param}` must be a date or time such as 2026-11-01 or 2026-11-01T12:00:00Z; "
                                  f"got {value[:64]!r}", param=param) from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
