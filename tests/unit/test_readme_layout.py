"""The README's layout table names every package of ``appliance/`` and every top-level folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.no_database

ROOT = Path(__file__).resolve().parents[2]


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Layout"):text.index("\n## ", text.index("## Layout") + 1)]


def test_every_package_of_the_appliance_has_a_line():
    layout = _layout()
    named = set(re.findall(r"`([a-z_]+)(?:/|\.py)`", layout))
    packages = {p.name for p in (ROOT / "appliance").iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in (ROOT / "appliance").glob("*.py") if p.stem not in ("__init__", "__main__")}
    missing = sorted((packages | modules) - named)
    assert not missing, f"README.md's layout table lacks: {missing}"


def test_every_top_level_folder_has_a_line():
    layout = _layout()
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
               and (ROOT / ".git").exists() and p.name not in ("wheelhouse", "build", "dist")}
    tracked = {f for f in folders if any((ROOT / f).rglob("*.py")) or any((ROOT / f).rglob("*.md"))}
    missing = sorted(f for f in tracked if f"`{f}/`" not in layout and not f.endswith(".egg-info"))
    assert not missing, f"README.md's layout table lacks: {missing}"
