"""requirements/lock.txt: pyproject.toml's ranges resolved once, pinned, and installed as pinned.

The lock is what `make run`, `make test` and `make wheelhouse` install; these
tests fail when pyproject.toml changes without `make lock`, when the lock pins
a release outside a range, and when the venv the suite runs in is not the lock.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lockfile", REPO / "requirements" / "lock.py")
lockfile = importlib.util.module_from_spec(_spec)
sys.modules["lockfile"] = lockfile
_spec.loader.exec_module(lockfile)

pytestmark = pytest.mark.no_database


def test_pyproject_and_the_lock_agree():
    assert lockfile.check() == []


def test_every_dependency_of_every_group_is_pinned():
    lock = lockfile.Lock.read()
    project = lockfile.project_table()
    assert set(lockfile.groups(project)) == {"base", "dev", "postgres", "ray", "build"}
    for group in lockfile.groups(project):
        assert lock.select([group]), group
    # Transitive ones too, each saying who asks for it.
    assert lock.pins["msgspec"].groups == ["base"] and "litestar" in lock.pins["msgspec"].via
    assert "psycopg-binary" in {p.name for p in lock.select(["postgres"])}
    assert "pytest" not in {p.name for p in lock.select(["base", "postgres"])}
    assert lock.pins["torch"].version == "2.13.0"  # the public version: a GPU host's +cuXXX build satisfies it


def test_the_suite_runs_on_exactly_the_lock():
    """The venv holds every pinned release and nothing else (pip check agreeing): what passes here is the lock."""
    assert lockfile.verify(sys.executable, lockfile.Lock.read()) == []


def _project(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    return lockfile.project_table(path)


def test_a_changed_range_is_caught(tmp_path):
    text = (REPO / "pyproject.toml").read_text()
    assert '"msgspec>=0.18",' in text
    changed = _project(tmp_path, text.replace('"msgspec>=0.18",', '"msgspec>=0.18,<0.23",'))
    problems = lockfile.check(project=changed)
    assert "pyproject.toml's dependencies changed since the lock was made: run `make lock`" in problems
    assert any("outside pyproject.toml's msgspec<0.23,>=0.18" in p for p in problems), problems


def test_a_new_dependency_is_caught(tmp_path):
    text = (REPO / "pyproject.toml").read_text()
    added = _project(tmp_path, text.replace('"msgspec>=0.18",', '"msgspec>=0.18",\n    "left-pad>=1",'))
    assert "base: left-pad>=1 is not in the lock" in lockfile.check(project=added)


def test_comments_and_layout_do_not_need_a_new_lock(tmp_path):
    text = (REPO / "pyproject.toml").read_text()
    same = _project(tmp_path, text.replace('"msgspec>=0.18",', '"msgspec >= 0.18" ,  # reworded'))
    assert lockfile.check(project=same) == []


def test_a_hand_edited_pin_is_caught(tmp_path):
    lock = lockfile.Lock.read()
    lock.pins["litestar"].version = "3.0.0"
    path = tmp_path / "lock.txt"
    lock.write(path)
    problems = lockfile.check(lockfile.Lock.read(path))
    assert "base: the lock pins litestar==3.0.0, outside pyproject.toml's litestar<3,>=2.25" in problems


def test_resolve_tags_each_pin_with_the_groups_that_need_it():
    """From a pip installation report: markers, extras of dependencies and shared packages."""
    project = {"dependencies": ["a>=1", "b; python_version < '3'"],
               "optional-dependencies": {"x": ["c[fast]"], "y": ["a"]}, "build-requires": ["d"]}
    report = {"environment": {}, "install": [
        {"metadata": {"name": "A", "version": "1.2", "requires_dist": ["e", "f; extra == 'never'"]}},
        {"metadata": {"name": "c", "version": "3.0", "requires_dist": ["g; extra == 'fast'"]}},
        {"metadata": {"name": "d", "version": "4"}},
        {"metadata": {"name": "e", "version": "5"}},
        {"metadata": {"name": "g", "version": "6"}},
    ]}
    pins = lockfile.resolve(project, report)
    assert {n: (p.version, p.groups) for n, p in pins.items()} == {
        "a": ("1.2", ["base", "y"]), "e": ("5", ["base", "y"]), "c": ("3.0", ["x"]), "g": ("6", ["x"]),
        "d": ("4", ["build"])}
    assert pins["g"].via == ["c"]
    with pytest.raises(lockfile.LockError, match="needs h, which pip's resolution does not hold"):
        lockfile.resolve({**project, "dependencies": ["h"]}, report)


def test_drift_names_upgrades_and_strays():
    lock = lockfile.Lock("", {"a": lockfile.Pin("a", "1.0"), "b": lockfile.Pin("b", "2.0"),
                              "torch": lockfile.Pin("torch", "2.13.0")})
    have = {"a": "1.1", "torch": "2.13.0+cu130", "stray": "0.1", "pip": "26.3", "appliance": "0.1.0"}
    assert lockfile.drift(have, lock) == ([("a", "1.0", "1.1")], ["b"], ["stray"])


def test_failed_tests_are_read_from_the_short_summary():
    out = ("....F\n=== short test summary info ===\n"
           "FAILED tests/a.py::test_x[1] - AssertionError: boom\nERROR tests/b.py::test_y - RuntimeError\n"
           "1 failed, 1 error, 4 passed in 2.0s\n")
    assert lockfile.failed_tests(out) == {"tests/a.py::test_x[1]", "tests/b.py::test_y"}


def _wheel(directory: Path, name: str, version: str, source: str) -> Path:
    """A minimal pure-Python wheel of a one-module distribution."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}.py": source.encode(),
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in {**files, f"{name}-{version}.dist-info/RECORD": record.encode()}.items():
            zf.writestr(member, data)
    return path


@pytest.mark.slow
def test_blame_names_the_upgrade_that_breaks_a_test(tmp_path, monkeypatch):
    """make test-latest's last step, for real: a venv holding a newer release than the lock, a test it breaks."""
    import site
    import subprocess

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "tinydep", "1.0", "VALUE = 1\n")
    _wheel(wheels, "tinydep", "2.0", "VALUE = 2\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # pytest, pip and the rest come from the suite's venv, after the new venv's own site-packages.
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "suite.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "tinydep==2.0"], check=True)
    (tmp_path / "test_dep.py").write_text(
        "import tinydep\n\ndef test_value():\n    assert tinydep.VALUE == 1\n\n"
        "def test_unrelated():\n    assert False\n")
    monkeypatch.chdir(tmp_path)
    lock = lockfile.Lock("", {"tinydep": lockfile.Pin("tinydep", "1.0")})

    culprits = lockfile.blame(python, ["test_dep.py::test_value", "test_dep.py::test_unrelated"], lock, [])
    assert culprits == {"test_dep.py::test_value": ["tinydep 1.0 -> 2.0"], "test_dep.py::test_unrelated": []}
    assert lockfile.installed(python)["tinydep"] == "2.0"  # put back as it was
