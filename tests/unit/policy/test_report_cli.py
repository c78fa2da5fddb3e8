"""``scan_file``, its renderers and the ``scan`` click command, on real files."""

from __future__ import annotations

import json

from click.testing import CliRunner

from appliance.policy import load_default_policy
from appliance.policy.cli import scan_command
from appliance.policy.report import render_json, render_text, scan_file

CHAT = {"messages": [{"role": "user", "content": "Hi, I'm Maria Kowalczyk (maria@example.org)."}]}
SECRET = {"prompt": "why is AKIAQ3EGRX5BLWZ7TY4P denied?", "completion": "Rotate it."}
CLEAN = {"text": "Quarterly revenue grew 12% to $4.2M."}


def write(tmp_path, *records, raw: bytes = b""):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(json.dumps(r).encode() for r in records) + b"\n" + raw)
    return path


def test_scan_file_reports_lines_and_decision(tmp_path, scanner):
    path = write(tmp_path, CHAT, CLEAN, SECRET, SECRET)
    report = scan_file(path, load_default_policy(), scanner=scanner)
    assert (report.records, report.fields) == (4, 6)
    d = report.decision
    assert d.outcome == "rejected"
    assert dict(d.blocked) == {"AWS_ACCESS_KEY_ID": (2, 3)}  # records: 0-based line indexes, as in the API
    assert dict(d.counts_by_type) == {"AWS_ACCESS_KEY_ID": 2, "EMAIL_ADDRESS": 1, "PERSON": 1}

    doc = json.loads(render_json(report))
    assert doc["decision"] == "rejected" and doc["records"] == 4
    assert doc["policy_hash"] == load_default_policy().content_hash
    assert doc["blocked"] == {"AWS_ACCESS_KEY_ID": [2, 3]} and doc["blocked_lines"] == {"AWS_ACCESS_KEY_ID": [3, 4]}
    assert {tuple(sorted(f)) for f in doc["findings"]} == {
        ("action", "end", "entity_type", "field", "record", "score", "start")
    }
    assert "AKIAQ3EGRX5BLWZ7TY4P" not in render_json(report)

    text = render_text(report)
    assert "Decision:  REJECTED" in text
    assert "AWS_ACCESS_KEY_ID: lines 3, 4" in text
    assert "AKIAQ3EGRX5BLWZ7TY4P" not in text and "Maria" not in text


def test_cli_exit_codes_and_output(tmp_path):
    runner = CliRunner()
    accepted = runner.invoke(scan_command, [str(write(tmp_path, CHAT, CLEAN))])
    assert accepted.exit_code == 0, accepted.output
    assert "ACCEPTED" in accepted.output and "PERSON" in accepted.output

    rejected = runner.invoke(scan_command, [str(write(tmp_path, SECRET)), "--json"])
    assert rejected.exit_code == 1
    assert json.loads(rejected.output)["blocked_lines"] == {"AWS_ACCESS_KEY_ID": [1]}

    bad = runner.invoke(scan_command, [str(write(tmp_path, CLEAN, raw=b'{"messages": [{"role": "bot", "content": "x"}]}\n'))])
    assert bad.exit_code == 2
    assert "error (line 2: messages[0].role):" in bad.output

    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ndefault: {action: block, threshold: 0.5}\nentities: {PERSON: hide}\n")
    bad_policy = runner.invoke(scan_command, [str(write(tmp_path, CLEAN)), "--policy", str(policy)])
    assert bad_policy.exit_code == 2
    assert "entities.PERSON.action: must be one of block, redact, pseudonymize, allow; got 'hide'" in bad_policy.output

    missing = runner.invoke(scan_command, [str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "error (file)" in missing.output


def test_custom_policy_allows_and_redacts(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ndefault: {action: redact, threshold: 0.5}\nentities: {AWS_ACCESS_KEY_ID: allow}\n")
    result = CliRunner().invoke(scan_command, [str(write(tmp_path, SECRET, CHAT)), "--policy", str(policy), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["decision"] == "accepted"
    # Allowed types are not looked for at all.
    assert "AWS_ACCESS_KEY_ID" not in doc["counts"]["by_type"]


def test_scan_file_applies_the_allow_list_across_batches(tmp_path):
    """The streaming scan keeps only two batches of texts, enough for the allow list on every line."""
    from appliance.policy import DEFAULT_POLICY_PATH, parse_policy
    from appliance.scanning import Scanner

    lines = [{"messages": [{"role": "user", "content": f"Ticket {i}: Otto now handles refunds for the EU."}]}
             for i in range(7)]
    path = tmp_path / "otto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    small = Scanner(batch_size=2)  # seven records: four batches
    plain = scan_file(path, load_default_policy(), scanner=small).decision
    assert plain.counts_by_action["redact"] == 7
    listed = parse_policy(DEFAULT_POLICY_PATH.read_text() + "\nallow_list: [Otto]\n")
    decision = scan_file(path, listed, scanner=small).decision
    assert decision.counts_by_action == {"block": 0, "redact": 0, "pseudonymize": 0, "allow": 7} and decision.outcome == "accepted"
