"""Docs and docstrings point only inside the repository.

A user's clone has no `../shared/` folder and no copy of the original specs, so every
reference to the algorithms or the metrics must resolve to `docs/ALGORITHMS.md` or
`docs/METRICS.md`, and every `docs/*.md` path named anywhere must exist.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("nlbench", "tasks", "baselines", "tests", "docs", "configs", "reports")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml"}

# A spec file named without the docs/ folder, or a path climbing out of the repository.
OUTSIDE = re.compile(r"\.\./shared|(?<![\w/])(?:shared/)?(?:algorithms|metrics)\.md")
DOC_PATH = re.compile(r"docs/[A-Za-z_]+\.md")
# "(issue 5)": a tracker a user's clone does not have; say what the thing is instead (the dated
# decision log, docs/decisions.md, may name where a decision came from)
ISSUE_REF = re.compile(r"\(issues? \d+|\bissue #?\d+\)")


def _files():
    yield ROOT / "README.md"
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and path != Path(__file__):
                yield path


def test_no_reference_leaves_the_repository():
    bad = []
    for path in _files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line) or (ISSUE_REF.search(line) and path.name != "decisions.md"):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "references outside the repository:\n" + "\n".join(bad)


def test_every_named_doc_exists():
    missing = set()
    for path in _files():
        for name in DOC_PATH.findall(path.read_text(encoding="utf-8")):
            if not (ROOT / name).is_file():
                missing.add(f"{path.relative_to(ROOT)} names {name}")
    assert not missing, "\n".join(sorted(missing))


def test_the_pattern_catches_what_it_must():
    for line in ("see ../shared/algorithms.md", "(algorithms.md, Eq. 3)", "shared/metrics.md"):
        assert OUTSIDE.search(line), line
    assert not OUTSIDE.search("see docs/ALGORITHMS.md and docs/METRICS.md")
    for line in ("Design (issue 5):", "pretraining (issue 16).", "see (issues 14, 16)"):
        assert ISSUE_REF.search(line), line
