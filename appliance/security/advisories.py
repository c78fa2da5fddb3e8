"""Known-vulnerable dependencies, checked offline (``appliance deps audit``).

pip-audit asks PyPI and OSV over the network; an air-gapped appliance (and its CI)
cannot. This module lists every distribution installed in the running Python
environment (:mod:`importlib.metadata`) and matches it against advisory data that
is already on disk:

* an OSV database the operator provides (:func:`load_osv`): osv.dev's PyPI dump
  ``all.zip``, a directory of OSV JSON/YAML records (a checkout of
  ``pypa/advisory-database``'s ``vulns/``), or one such file;
* otherwise the ``safety-db`` package (:func:`load_safety_db`), PyUp's free
  database as of July 2021. It is a *2021 snapshot*: advisories published since
  are missing, so every report made from it says so. Supply an OSV dump for
  current data.

OSV semantics follow https://ossf.github.io/osv-schema/: only
``affected[].package.ecosystem == "PyPI"``; names compared after PEP 503
normalisation; a version is affected when it is listed in ``affected[].versions``
or falls in an ``ECOSYSTEM`` (or ``SEMVER``) range, whose events are walked in
version order (``introduced`` "0" first: ``introduced`` opens, ``fixed`` closes
at that version, ``last_affected`` closes after it, ``limit`` caps the range);
``withdrawn`` records are skipped. Versions compare as :mod:`packaging` versions.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from appliance.errors import InvalidRequestError

#: The distribution that ships the built-in baseline, and the file read from it.
SAFETY_DB_DIST = "safety-db"
SAFETY_DB_FILE = "safety_db/insecure_full.json"

STALE_NOTE = (
    "safety-db is PyUp's free advisory database frozen in 2021: vulnerabilities published since "
    "then are NOT covered. Supply a current OSV dump (osv.dev's PyPI all.zip, or a directory of "
    "OSV files) with --osv or APPLIANCE_ADVISORY_DB."
)

_OSV_SUFFIXES = (".json", ".yaml", ".yml")
_RANGE_TYPES = ("ECOSYSTEM", "SEMVER")  # GIT ranges name commits, not releases: ignored.


@dataclass(frozen=True)
class Installed:
    """One installed distribution: its name as published and its version string."""

    name: str
    version: str

    @property
    def key(self) -> str:
        return canonicalize_name(self.name)


@dataclass
class Finding:
    """An installed distribution affected by one advisory (aliases merged)."""

    package: str
    installed: str
    id: str
    aliases: list[str] = field(default_factory=list)
    fixed_in: list[str] = field(default_factory=list)
    summary: str = ""
    ignored_reason: str | None = None

    @property
    def ids(self) -> set[str]:
        return {self.id.upper(), *(a.upper() for a in self.aliases)}

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.ignored_reason is None:
            out.pop("ignored_reason")
        return out


class AdvisoryDatabase(Protocol):
    """What :func:`audit` needs from a source of advisories."""

    source: dict[str, Any]
    warnings: list[str]

    @property
    def advisory_count(self) -> int: ...

    def findings_for(self, dist: Installed, version: Version) -> list[Finding]: ...


def _version_key(text: str) -> tuple[int, Version | str]:
    try:
        return (0, Version(text))
    except InvalidVersion:
        return (1, text)


def _sorted_versions(versions: Iterable[str]) -> list[str]:
    return sorted(set(versions), key=_version_key)


# --------------------------------------------------------------------------- OSV


class _Unevaluable(Exception):
    """A range whose event versions are not PEP 440."""


def osv_range_affects(events: list[Mapping[str, Any]], version: Version) -> tuple[bool, str | None]:
    """Whether ``version`` lies in an OSV range, and the first fixed release after it.

    Raises :class:`_Unevaluable` when an event's version does not parse.
    """
    points: list[tuple[Version | None, str, str]] = []
    limits: list[Version | None] = []
    for event in events:
        for kind in ("introduced", "fixed", "last_affected", "limit"):
            if kind not in event:
                continue
            raw = str(event[kind])
            if (kind == "introduced" and raw == "0") or (kind == "limit" and raw == "*"):
                parsed = None
            else:
                try:
                    parsed = Version(raw)
                except InvalidVersion as exc:
                    raise _Unevaluable(raw) from exc
            if kind == "limit":
                limits.append(parsed)  # None: "*", no limit
            else:
                points.append((parsed, kind, raw))
    # "0" (None) sorts before every version; the sort is stable for equal versions.
    points.sort(key=lambda p: (p[0] is not None, p[0] or Version("0")))
    affected = False
    for point, kind, _ in points:
        if kind == "introduced" and (point is None or version >= point):
            affected = True
        elif kind == "fixed" and point is not None and version >= point:
            affected = False
        elif kind == "last_affected" and point is not None and version > point:
            affected = False
    if affected and limits and not any(limit is None or version < limit for limit in limits):
        affected = False
    fixed = next((raw for point, kind, raw in points
                  if kind == "fixed" and point is not None and point > version), None)
    return affected, fixed


def osv_affected_entry_matches(entry: Mapping[str, Any], version: Version, raw_version: str,
                               warnings: list[str] | None = None, record_id: str = "") -> tuple[bool, list[str]]:
    """Whether one ``affected[]`` entry covers ``version``; with the fixed releases it names."""
    hit = False
    listed = entry.get("versions") or []
    if raw_version in listed:
        hit = True
    else:
        for text in listed:
            try:
                if Version(str(text)) == version:
                    hit = True
                    break
            except InvalidVersion:
                continue
    fixed: list[str] = []
    for rng in entry.get("ranges") or []:
        if not isinstance(rng, Mapping) or rng.get("type") not in _RANGE_TYPES:
            continue
        try:
            in_range, fix = osv_range_affects(list(rng.get("events") or []), version)
        except _Unevaluable as exc:
            if warnings is not None:
                warnings.append(f"{record_id}: range event version {exc.args[0]!r} is not PEP 440; range not evaluated")
            continue
        if in_range:
            hit = True
            if fix:
                fixed.append(fix)
    return hit, fixed


class OsvDatabase:
    """OSV records indexed by the normalised PyPI names they affect."""

    def __init__(self, records: Iterable[Mapping[str, Any]], source: dict[str, Any],
                 warnings: list[str] | None = None) -> None:
        self.warnings: list[str] = warnings if warnings is not None else []  # filled while records load
        self.by_package: dict[str, list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
        self.records = 0
        self.withdrawn = 0
        for record in records:
            if record.get("withdrawn"):
                self.withdrawn += 1
                continue
            pypi = False
            for entry in record.get("affected") or []:
                package = entry.get("package") if isinstance(entry, Mapping) else None
                if not isinstance(package, Mapping) or package.get("ecosystem") != "PyPI":
                    continue
                name = package.get("name")
                if not isinstance(name, str) or not name:
                    continue
                self.by_package.setdefault(canonicalize_name(name), []).append((record, entry))
                pypi = True
            self.records += pypi
        self.source = {**source, "advisories": self.records, "withdrawn_skipped": self.withdrawn}

    @property
    def advisory_count(self) -> int:
        return self.records

    def findings_for(self, dist: Installed, version: Version) -> list[Finding]:
        by_id: dict[str, Finding] = {}
        for record, entry in self.by_package.get(dist.key, []):
            record_id = str(record["id"])
            hit, fixed = osv_affected_entry_matches(entry, version, dist.version, self.warnings, record_id)
            if not hit:
                continue
            finding = by_id.get(record_id)
            if finding is None:
                aliases = [str(a) for a in record.get("aliases") or [] if a]
                summary = str(record.get("summary") or record.get("details") or "").strip()
                finding = by_id[record_id] = Finding(dist.name, dist.version, record_id, aliases, [],
                                                     summary.splitlines()[0][:200] if summary else "")
            finding.fixed_in = _sorted_versions([*finding.fixed_in, *fixed])
        return list(by_id.values())


def _is_osv_record(doc: Any) -> bool:
    return isinstance(doc, Mapping) and isinstance(doc.get("id"), str) and isinstance(doc.get("affected", []), list)


def _parse_osv_document(name: str, data: bytes, warnings: list[str]) -> list[Mapping[str, Any]]:
    try:
        if name.lower().endswith(".json"):
            doc = json.loads(data)
        else:
            import yaml

            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            doc = yaml.load(data, Loader=loader)  # noqa: S506 - a safe loader
    except Exception as exc:  # ValueError from json, yaml.YAMLError: one bad file skips only itself
        warnings.append(f"{name}: not valid JSON/YAML ({type(exc).__name__}); skipped")
        return []
    docs = doc if isinstance(doc, list) else [doc]
    return [d for d in docs if _is_osv_record(d)]


def _iter_osv_path(path: Path, warnings: list[str]) -> Iterator[Mapping[str, Any]]:
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in _OSV_SUFFIXES and p.is_file()):
            yield from _parse_osv_document(file.name, file.read_bytes(), warnings)
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir() or not info.filename.lower().endswith(_OSV_SUFFIXES):
                    continue
                yield from _parse_osv_document(info.filename, archive.read(info), warnings)
    else:
        yield from _parse_osv_document(path.name, path.read_bytes(), warnings)


def load_osv(path: Path, *, param: str = "--osv") -> OsvDatabase:
    """An OSV database from osv.dev's ``all.zip``, a directory of OSV files, or one file.

    Raises :class:`InvalidRequestError` when ``path`` is missing or holds no PyPI record:
    an empty database would pass every installation.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidRequestError(f"advisory database {path} does not exist", param=param)
    if not (path.is_dir() or zipfile.is_zipfile(path) or path.suffix.lower() in _OSV_SUFFIXES):
        raise InvalidRequestError(
            f"advisory database {path} is neither a directory, a zip archive (osv.dev's all.zip) "
            "nor an OSV .json/.yaml file", param=param)
    warnings: list[str] = []
    try:
        db = OsvDatabase(_iter_osv_path(path, warnings), {"kind": "osv", "path": str(path)}, warnings)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InvalidRequestError(f"cannot read advisory database {path}: {exc.__class__.__name__}",
                                  param=param) from exc
    if db.records == 0:
        raise InvalidRequestError(
            f"advisory database {path} holds no OSV record for the PyPI ecosystem; expected osv.dev's "
            "PyPI all.zip or a directory of OSV JSON/YAML files", param=param)
    return db


# --------------------------------------------------------------------- safety-db


class SafetyDatabase:
    """PyUp's safety-db ``insecure_full.json``: ``{name: [{id, cve, specs, advisory}]}``."""

    def __init__(self, data: Mapping[str, Any], source: dict[str, Any]) -> None:
        self.warnings: list[str] = []
        self.by_package: dict[str, list[Mapping[str, Any]]] = {}
        count = 0
        for name, advisories in data.items():
            if name == "$meta" or not isinstance(advisories, list):
                continue
            self.by_package.setdefault(canonicalize_name(name), []).extend(advisories)
            count += len(advisories)
        self._count = count
        meta = data.get("$meta") or {}
        snapshot = None
        if isinstance(meta, Mapping) and isinstance(meta.get("timestamp"), int | float):
            snapshot = datetime.fromtimestamp(meta["timestamp"], UTC).date().isoformat()
        self.source = {**source, "advisories": count, "snapshot": snapshot, "note": STALE_NOTE}
        self._specs: dict[str, SpecifierSet | None] = {}

    @property
    def advisory_count(self) -> int:
        return self._count

    def _spec(self, text: str, advisory_id: str) -> SpecifierSet | None:
        if text not in self._specs:
            try:
                self._specs[text] = SpecifierSet(text)
            except InvalidSpecifier:
                self._specs[text] = None
                self.warnings.append(f"{advisory_id}: specifier {text!r} is not PEP 440; not evaluated")
        return self._specs[text]

    def findings_for(self, dist: Installed, version: Version) -> list[Finding]:
        findings = []
        for advisory in self.by_package.get(dist.key, []):
            advisory_id = str(advisory.get("id") or "")
            fixed: list[str] = []
            hit = False
            for text in advisory.get("specs") or []:
                spec = self._spec(str(text), advisory_id)
                if spec is None or not spec.contains(version, prereleases=True):
                    continue
                hit = True
                fixed += [s.version for s in spec if s.operator == "<"]
            if not hit:
                continue
            cve = str(advisory.get("cve") or "").strip()
            text = " ".join(str(advisory.get("advisory") or "").split())
            findings.append(Finding(dist.name, dist.version, advisory_id, [cve] if cve else [],
                                    _sorted_versions(fixed), text[:200]))
        return findings


def load_safety_db() -> SafetyDatabase:
    """The built-in baseline: the installed ``safety-db`` package (not imported: its ``__init__``
    opens files relative to the working directory)."""
    try:
        dist = importlib.metadata.distribution(SAFETY_DB_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise InvalidRequestError(
            "no advisory data: pass an OSV dump with --osv (or APPLIANCE_ADVISORY_DB), or install the "
            f"offline baseline with `pip install {SAFETY_DB_DIST}` (part of the appliance's dev extra)",
            param="--osv") from None
    path = Path(str(dist.locate_file(SAFETY_DB_FILE)))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read {SAFETY_DB_DIST}'s {SAFETY_DB_FILE}: {exc.__class__.__name__}",
                                  param="--osv") from exc
    db = SafetyDatabase(data, {"kind": "safety-db", "version": dist.version, "path": str(path)})
    if db.advisory_count == 0:
        raise InvalidRequestError(f"{path} holds no advisory", param="--osv")
    return db


def open_database(osv: Path | None, *, param: str = "--osv") -> AdvisoryDatabase:
    """The OSV database at ``osv``, else the safety-db baseline."""
    return load_osv(osv, param=param) if osv is not None else load_safety_db()


# ------------------------------------------------------------------------ audit


def installed_distributions(path: list[str] | None = None) -> list[Installed]:
    """Every distribution visible to this interpreter (or on ``path``), one per name and version."""
    seen: dict[tuple[str, str], Installed] = {}
    for dist in importlib.metadata.distributions(**({"path": path} if path is not None else {})):
        name = dist.metadata["Name"] if dist.metadata else None
        if not name or not dist.version:
            continue
        item = Installed(name, dist.version)
        seen.setdefault((item.key, item.version), item)
    return sorted(seen.values(), key=lambda d: (d.key, _version_key(d.version)))


def parse_ignores(values: Iterable[str]) -> dict[str, str]:
    """``ID=reason`` options as ``{ID (upper case): reason}``; a reason is required."""
    out: dict[str, str] = {}
    for value in values:
        advisory_id, sep, reason = value.partition("=")
        advisory_id, reason = advisory_id.strip(), reason.strip()
        if not sep or not advisory_id or not reason:
            raise InvalidRequestError(
                f"--ignore takes ID=REASON (an accepted risk needs its reason), e.g. "
                f"--ignore 'PYSEC-2024-1=not reachable: we never parse untrusted input'; got {value!r}",
                param="--ignore")
        out[advisory_id.upper()] = reason
    return out


def _merge_aliases(findings: list[Finding]) -> list[Finding]:
    """One finding per vulnerability: records of one package that alias each other are merged."""
    merged: list[Finding] = []
    for finding in sorted(findings, key=lambda f: (canonicalize_name(f.package), f.installed, f.id)):
        for kept in merged:
            if (canonicalize_name(kept.package), kept.installed) == (canonicalize_name(finding.package),
                                                                    finding.installed) and kept.ids & finding.ids:
                kept.aliases = sorted({*kept.aliases, finding.id, *finding.aliases} - {kept.id})
                kept.fixed_in = _sorted_versions([*kept.fixed_in, *finding.fixed_in])
                kept.summary = kept.summary or finding.summary
                break
        else:
            merged.append(dataclasses.replace(finding, aliases=sorted(set(finding.aliases) - {finding.id})))
    return merged


@dataclass
class AuditReport:
    source: dict[str, Any]
    checked: int
    findings: list[Finding]
    ignored: list[Finding]
    unused_ignores: list[str]
    warnings: list[str]

    @property
    def affected(self) -> bool:
        return bool(self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "checked": self.checked,
            "affected": self.affected,
            "findings": [f.as_dict() for f in self.findings],
            "ignored": [f.as_dict() for f in self.ignored],
            "unused_ignores": self.unused_ignores,
            "warnings": self.warnings,
        }


def audit(db: AdvisoryDatabase, installed: Iterable[Installed],
          ignores: Mapping[str, str] | None = None) -> AuditReport:
    """Match ``installed`` against ``db``; findings whose id or alias is in ``ignores`` are set aside."""
    ignores = {k.upper(): v for k, v in (ignores or {}).items()}
    warnings: list[str] = []
    raw: list[Finding] = []
    checked = 0
    for dist in installed:
        checked += 1
        try:
            version = Version(dist.version)
        except InvalidVersion:
            warnings.append(f"{dist.name} {dist.version!r}: version is not PEP 440; not checked")
            continue
        raw += db.findings_for(dist, version)
    findings, ignored, used = [], [], set()
    for finding in _merge_aliases(raw):
        matched = sorted(finding.ids & ignores.keys())
        if matched:
            used.update(matched)
            finding.ignored_reason = ignores[matched[0]]
            ignored.append(finding)
        else:
            findings.append(finding)
    warnings += list(dict.fromkeys(db.warnings))
    return AuditReport(db.source, checked, findings, ignored, sorted(ignores.keys() - used), warnings)


def format_report(report: AuditReport) -> str:
    """The report as text: a header naming the data, a table, and a verdict."""
    src = report.source
    lines = []
    if src.get("kind") == "safety-db":
        snapshot = f", snapshot of {src['snapshot']}" if src.get("snapshot") else ""
        lines.append(f"advisory data: safety-db {src.get('version')} ({src.get('advisories')} advisories{snapshot})")
        lines.append(f"note: {STALE_NOTE}")
    else:
        lines.append(f"advisory data: OSV at {src.get('path')} ({src.get('advisories')} PyPI advisories)")
    lines.append(f"checked {report.checked} installed distributions")
    if report.findings:
        header = ("package", "installed", "advisory", "fixed in", "aliases")
        rows = [(f.package, f.installed, f.id, ", ".join(f.fixed_in) or "no fix known", ", ".join(f.aliases))
                for f in report.findings]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        lines.append("")
        for row in [header, *rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    if report.ignored:
        lines.append("")
        lines.append("ignored (accepted risks):")
        for f in report.ignored:
            lines.append(f"  {f.package} {f.installed} {f.id}: {f.ignored_reason}")
    for unused in report.unused_ignores:
        lines.append(f"note: --ignore {unused} matched no finding (stale?)")
    for warning in report.warnings:
        lines.append(f"warning: {warning}")
    lines.append("")
    if report.findings:
        packages = len({(canonicalize_name(f.package), f.installed) for f in report.findings})
        lines.append(f"{len(report.findings)} known vulnerabilit{'y' if len(report.findings) == 1 else 'ies'} "
                     f"in {packages} installed distribution{'' if packages == 1 else 's'}")
    else:
        lines.append("no known vulnerability in the installed distributions")
    return "\n".join(lines)
