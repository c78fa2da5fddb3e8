"""The offline dependency advisory check (``appliance deps audit``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

from appliance.errors import InvalidRequestError
from appliance.security.advisories import (
    STALE_NOTE,
    Installed,
    OsvDatabase,
    SafetyDatabase,
    audit,
    format_report,
    installed_distributions,
    load_osv,
    load_safety_db,
    osv_range_affects,
    parse_ignores,
)

APPLIANCE = Path(sys.executable).with_name("appliance")


def osv(vid: str, name: str, *, ranges=None, versions=None, ecosystem="PyPI", aliases=(), **extra) -> dict:
    affected = {"package": {"ecosystem": ecosystem, "name": name}}
    if ranges is not None:
        affected["ranges"] = [{"type": "ECOSYSTEM", "events": events} for events in ranges]
    if versions is not None:
        affected["versions"] = versions
    return {"id": vid, "aliases": list(aliases), "summary": f"{vid} summary", "affected": [affected], **extra}


def ids(db, name: str, version: str, ignores=None) -> list[str]:
    return [f.id for f in audit(db, [Installed(name, version)], ignores).findings]


def db_of(*records) -> OsvDatabase:
    return OsvDatabase(records, {"kind": "osv", "path": "test"})


# ------------------------------------------------------------------ OSV ranges


@pytest.mark.parametrize(("version", "affected"), [
    ("0.9", False), ("1.0", True), ("1.2.2", True), ("1.2.3rc1", True), ("1.2.3", False), ("2.0", False),
])
def test_introduced_fixed_is_a_half_open_interval(version, affected):
    hit, fixed = osv_range_affects([{"introduced": "1.0"}, {"fixed": "1.2.3"}], Version(version))
    assert hit is affected
    if affected:
        assert fixed == "1.2.3"


def test_introduced_zero_means_from_the_first_release_and_events_are_sorted():
    # Two intervals, events deliberately out of order: [0, 1.0) and [2.0, 2.5).
    events = [{"introduced": "2.0"}, {"fixed": "2.5"}, {"fixed": "1.0"}, {"introduced": "0"}]
    assert osv_range_affects(events, Version("0.0.1")) == (True, "1.0")
    assert osv_range_affects(events, Version("1.5"))[0] is False
    assert osv_range_affects(events, Version("2.1")) == (True, "2.5")
    assert osv_range_affects(events, Version("3"))[0] is False


def test_last_affected_is_inclusive_and_names_no_fix():
    events = [{"introduced": "1.0"}, {"last_affected": "1.4"}]
    assert osv_range_affects(events, Version("1.4")) == (True, None)
    assert osv_range_affects(events, Version("1.4.post1"))[0] is False
    assert osv_range_affects(events, Version("1.5"))[0] is False
    db = db_of(osv("PYSEC-1", "pkg", ranges=[events]))
    [finding] = audit(db, [Installed("pkg", "1.3")]).findings
    assert finding.fixed_in == []
    assert "no fix known" in format_report(audit(db, [Installed("pkg", "1.3")]))


def test_limit_caps_a_range():
    events = [{"introduced": "0"}, {"limit": "2.0"}]
    assert osv_range_affects(events, Version("1.9"))[0] is True
    assert osv_range_affects(events, Version("2.0"))[0] is False
    assert osv_range_affects([*events, {"limit": "*"}], Version("2.0"))[0] is True


def test_explicit_versions_compare_as_pep440_versions():
    db = db_of(osv("GHSA-aaaa", "pkg", versions=["1.0", "1.1"]))
    assert ids(db, "pkg", "1.1") == ["GHSA-aaaa"]
    assert ids(db, "pkg", "1.0.0") == ["GHSA-aaaa"]
    assert ids(db, "pkg", "1.2") == []


def test_withdrawn_records_other_ecosystems_and_git_ranges_are_ignored():
    git = osv("OSV-GIT", "pkg")
    git["affected"][0]["ranges"] = [{"type": "GIT", "repo": "https://example.invalid/x",
                                    "events": [{"introduced": "0"}]}]
    db = db_of(
        osv("PYSEC-W", "pkg", ranges=[[{"introduced": "0"}]], withdrawn="2024-01-01T00:00:00Z"),
        osv("GHSA-npm", "pkg", ranges=[[{"introduced": "0"}]], ecosystem="npm"),
        osv("DEBIAN-1", "pkg", ranges=[[{"introduced": "0"}]], ecosystem="Debian:12"),
        git,
    )
    assert ids(db, "pkg", "1.0") == []
    assert db.withdrawn == 1


def test_names_are_compared_after_pep503_normalisation():
    db = db_of(osv("PYSEC-N", "Zope_Interface.Extra", ranges=[[{"introduced": "0"}, {"fixed": "5"}]]))
    assert ids(db, "zope-interface-extra", "4.0") == ["PYSEC-N"]
    assert ids(db, "ZOPE.interface_extra", "4.0") == ["PYSEC-N"]
    [finding] = audit(db, [Installed("ZOPE.interface_extra", "4.0")]).findings
    assert finding.package == "ZOPE.interface_extra"  # reported as installed


def test_records_that_alias_each_other_are_one_finding_and_can_be_ignored_by_any_alias():
    rng = [[{"introduced": "0"}, {"fixed": "2.0"}]]
    db = db_of(osv("PYSEC-2021-1", "pkg", ranges=rng, aliases=["CVE-2021-1", "GHSA-xxxx"]),
               osv("GHSA-xxxx", "pkg", ranges=[[{"introduced": "0"}, {"fixed": "2.0.1"}]],
                   aliases=["CVE-2021-1"]),
               osv("PYSEC-2021-2", "pkg", ranges=rng))
    report = audit(db, [Installed("pkg", "1.0")])
    assert len(report.findings) == 2
    merged = next(f for f in report.findings if "CVE-2021-1" in f.aliases)
    assert merged.id == "GHSA-xxxx" and set(merged.aliases) == {"CVE-2021-1", "PYSEC-2021-1"}
    assert merged.fixed_in == ["2.0", "2.0.1"]

    report = audit(db, [Installed("pkg", "1.0")], parse_ignores(["cve-2021-1=not reachable here", "PYSEC-9=old"]))
    assert [f.id for f in report.findings] == ["PYSEC-2021-2"]
    assert [(f.id, f.ignored_reason) for f in report.ignored] == [("GHSA-xxxx", "not reachable here")]
    assert report.unused_ignores == ["PYSEC-9"]
    text = format_report(report)
    assert "not reachable here" in text and "--ignore PYSEC-9 matched no finding" in text


@pytest.mark.parametrize("value", ["PYSEC-1", "PYSEC-1=", "=reason", "PYSEC-1=   "])
def test_an_ignore_needs_an_id_and_a_reason(value):
    with pytest.raises(InvalidRequestError, match="ID=REASON") as info:
        parse_ignores([value])
    assert info.value.param == "--ignore"


def test_unevaluable_versions_are_warnings_not_crashes():
    db = db_of(osv("PYSEC-B", "pkg", ranges=[[{"introduced": "not a version!"}]]),
               osv("PYSEC-C", "pkg", versions=["weird-ver"]))
    report = audit(db, [Installed("pkg", "1.0"), Installed("other", "2004d-local-thing")])
    assert report.findings == []
    assert any("PYSEC-B" in w for w in report.warnings)
    assert any("other" in w and "not PEP 440" in w for w in report.warnings)


# ------------------------------------------------------------- loading OSV data


def _records():
    return [osv("PYSEC-2020-1", "Demo-Pkg", ranges=[[{"introduced": "0"}, {"fixed": "1.5"}]]),
            osv("GHSA-2222", "other", versions=["3.0"])]


def test_all_zip_from_osv_dev(tmp_path):
    dump = tmp_path / "all.zip"
    with zipfile.ZipFile(dump, "w") as archive:
        for record in _records():
            archive.writestr(f"{record['id']}.json", json.dumps(record))
        archive.writestr("broken.json", "{not json")
    db = load_osv(dump)
    assert db.advisory_count == 2
    assert ids(db, "demo_pkg", "1.4") == ["PYSEC-2020-1"]
    assert ids(db, "demo_pkg", "1.5") == []
    assert ids(db, "other", "3.0") == ["GHSA-2222"]
    assert any("broken.json" in w for w in db.warnings)


def test_a_directory_of_yaml_and_json_like_the_advisory_database_checkout(tmp_path):
    vulns = tmp_path / "vulns"
    (vulns / "demo-pkg").mkdir(parents=True)
    (vulns / "other").mkdir()
    a, b = _records()
    (vulns / "demo-pkg" / "PYSEC-2020-1.yaml").write_text(yaml.safe_dump(a))
    (vulns / "other" / "GHSA-2222.json").write_text(json.dumps(b))
    (vulns / "README.md").write_text("# not a record\n")
    db = load_osv(vulns)
    assert db.advisory_count == 2
    assert ids(db, "Demo.Pkg", "1.0") == ["PYSEC-2020-1"]
    assert load_osv(vulns / "other" / "GHSA-2222.json").advisory_count == 1


def test_missing_empty_or_foreign_databases_are_errors_not_a_clean_bill(tmp_path):
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_osv(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequestError, match="no OSV record for the PyPI ecosystem") as info:
        load_osv(tmp_path / "empty", param="APPLIANCE_ADVISORY_DB")
    assert info.value.param == "APPLIANCE_ADVISORY_DB"
    npm_only = tmp_path / "npm.json"
    npm_only.write_text(json.dumps(osv("GHSA-n", "left-pad", versions=["1.0"], ecosystem="npm")))
    with pytest.raises(InvalidRequestError, match="no OSV record"):
        load_osv(npm_only)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidRequestError, match="neither a directory"):
        load_osv(tmp_path / "notes.txt")


# -------------------------------------------------------------------- safety-db


def test_safety_db_specs_any_matching_set_affects():
    db = SafetyDatabase({
        "$meta": {"advisory": "PyUp.io metadata", "timestamp": 1625119202},
        "Some_Pkg": [
            {"id": "pyup.io-1", "cve": "CVE-2020-1", "specs": ["<1.2.3"], "advisory": "a", "v": "<1.2.3"},
            {"id": "pyup.io-2", "cve": None, "specs": [">=2.0,<2.2", ">=3.0,<3.0.5"], "advisory": "b", "v": ""},
            {"id": "pyup.io-3", "cve": None, "specs": ["<=4.0"], "advisory": "c", "v": "<=4.0"},
            {"id": "pyup.io-4", "cve": None, "specs": ["<r5238"], "advisory": "not PEP 440", "v": ""},
        ],
    }, {"kind": "safety-db", "version": "test"})
    assert db.source["snapshot"] == "2021-07-01"
    assert ids(db, "some-pkg", "1.2.2") == ["pyup.io-1", "pyup.io-3"]
    assert ids(db, "some-pkg", "1.2.3") == ["pyup.io-3"]
    assert ids(db, "some-pkg", "2.1") == ["pyup.io-2", "pyup.io-3"]
    assert ids(db, "some-pkg", "2.2") == ["pyup.io-3"]
    assert ids(db, "some-pkg", "3.0.4") == ["pyup.io-2", "pyup.io-3"]
    assert ids(db, "some-pkg", "4.0.1") == []
    findings = {f.id: f for f in audit(db, [Installed("some-pkg", "1.0")]).findings}
    assert findings["pyup.io-1"].fixed_in == ["1.2.3"] and findings["pyup.io-1"].aliases == ["CVE-2020-1"]
    assert findings["pyup.io-3"].fixed_in == []
    assert any("pyup.io-4" in w and "r5238" in w for w in audit(db, [Installed("some-pkg", "1.0")]).warnings)


def test_the_real_safety_db_knows_old_pyyaml_and_cryptography():
    db = load_safety_db()
    assert db.source["kind"] == "safety-db" and db.source["snapshot"].startswith("2021-")
    assert db.advisory_count > 2000
    pyyaml = {f.id: f for f in audit(db, [Installed("PyYAML", "5.3")]).findings}
    assert pyyaml["pyup.io-38100"].fixed_in == ["5.3.1"] and pyyaml["pyup.io-38100"].aliases == ["CVE-2020-1747"]
    assert pyyaml["pyup.io-39611"].fixed_in == ["5.4"]
    assert ids(db, "pyyaml", "5.4") == []
    crypto = {f.id: f for f in audit(db, [Installed("cryptography", "2.2")]).findings}
    assert crypto["pyup.io-36351"].fixed_in == ["2.3"]  # CVE-2018-10903, specs ">=1.9.0,<2.3"
    text = format_report(audit(db, [Installed("cryptography", "2.2")]))
    assert STALE_NOTE in text and "2021" in text and "pyup.io-36351" in text


# ------------------------------------------------- the real installed environment


def test_installed_distributions_lists_this_environment():
    dists = {d.key: d for d in installed_distributions()}
    import packaging

    assert dists["packaging"].version == packaging.__version__
    assert {"click", "cryptography", "pyyaml", "safety-db"} <= dists.keys()


def test_the_installed_environment_has_no_known_vulnerable_pin():
    report = audit(load_safety_db(), installed_distributions())
    assert report.checked > 50
    assert report.findings == [], format_report(report)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return subprocess.run([str(APPLIANCE), "deps", "audit", *args], env={**environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_cli_on_the_installed_environment_exits_0_and_says_the_data_is_from_2021():
    proc = _cli()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no known vulnerability" in proc.stdout and "frozen in 2021" in proc.stdout


def test_cli_exits_1_on_a_finding_and_0_once_it_is_ignored_with_a_reason(tmp_path):
    from importlib.metadata import version

    vulns = tmp_path / "vulns"
    vulns.mkdir()
    record = osv("PYSEC-2099-7", "Click", ranges=[[{"introduced": "0"}, {"fixed": "99"}]], aliases=["CVE-2099-7"])
    (vulns / "PYSEC-2099-7.yaml").write_text(yaml.safe_dump(record))

    proc = _cli("--osv", str(vulns))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    header, row = [line.split() for line in proc.stdout.splitlines() if "PYSEC-2099-7" in line or
                   line.startswith("package ")]
    assert header[:3] == ["package", "installed", "advisory"]
    assert row[0].lower() == "click" and row[1:4] == [version("click"), "PYSEC-2099-7", "99"]
    assert "frozen in 2021" not in proc.stdout

    proc = _cli("--json", APPLIANCE_ADVISORY_DB=str(vulns))
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["affected"] is True and report["source"]["kind"] == "osv"
    assert [(f["id"], f["fixed_in"], f["aliases"]) for f in report["findings"]] == [
        ("PYSEC-2099-7", ["99"], ["CVE-2099-7"])]

    proc = _cli("--osv", str(vulns), "--ignore", "CVE-2099-7=test fixture, not a real advisory")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test fixture, not a real advisory" in proc.stdout

    proc = _cli("--ignore", "CVE-2099-7")
    assert proc.returncode == 2 and "ID=REASON" in proc.stderr
    proc = _cli(APPLIANCE_ADVISORY_DB=str(tmp_path / "missing"))
    assert proc.returncode == 2 and "APPLIANCE_ADVISORY_DB" in proc.stderr
