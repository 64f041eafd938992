"""The published report (reports/) is what `make report` makes of the committed result tables.

`reports/data/<config name>/` holds the Parquet tables of every published config; re-reporting
all of them must give `reports/leaderboard.json` (and `reports/in-context/leaderboard.json` from
the in-context config alone), so a reader can audit every number, and the in-context entries
must be in the combined leaderboard, with `chance` on each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlbench.report import load_results
from nlbench.report.build import report_document

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "reports" / "data"
IN_CONTEXT = "reports/data/in-context-cpu"
ABLATION = "reports/data/cms-ablation"  # read apart (`--ablation`), as the Makefile does


def _published_dirs() -> list[str]:
    # the same list, in the same order and spelling, as the Makefile's PUBLISHED
    # (make sorts the names with their trailing slash: "a-b/" before "a/")
    dirs = sorted(f"reports/data/{p.name}/" for p in DATA.iterdir() if p.is_dir())
    return [d.rstrip("/") for d in dirs if d.rstrip("/") != ABLATION]


def _rebuild(dirs, monkeypatch, ablation: str | None = None) -> dict:
    monkeypatch.chdir(ROOT)  # sources are recorded as given: relative to the repository root
    abl = load_results([ablation]) if ablation else None
    doc, _ = report_document(load_results(dirs), abl)  # what `nlbench report` writes as leaderboard.json
    return json.loads(json.dumps(doc, allow_nan=False))


def _published(rel: str) -> dict:
    return json.loads((ROOT / rel).read_text())


def _same(doc: dict, published: dict):
    doc, published = dict(doc), dict(published)
    doc.pop("generated_at"), published.pop("generated_at")
    assert doc.keys() == published.keys()
    for k in doc:  # key by key, so a failure names what differs
        assert doc[k] == published[k], f"{k!r} differs: re-run `make report` and commit reports/"


def test_in_context_data_is_committed():
    assert IN_CONTEXT in _published_dirs()
    for table in ("runs", "matrix", "curves"):
        assert list((ROOT / IN_CONTEXT / table).glob("*.parquet")), f"{IN_CONTEXT}/{table} has no Parquet file"


def test_leaderboard_json_is_the_report_of_every_committed_data_dir(monkeypatch):
    ablation = ABLATION if (ROOT / ABLATION / "runs").is_dir() else None
    _same(_rebuild(_published_dirs(), monkeypatch, ablation), _published("reports/leaderboard.json"))


def test_in_context_report_is_the_report_of_its_data(monkeypatch):
    _same(_rebuild([IN_CONTEXT], monkeypatch), _published("reports/in-context/leaderboard.json"))


def _in_context_entries(doc: dict) -> list[dict]:
    return [e for s in doc["streams"] if s["protocol"] == "in_context" and s["score"] == "accuracy"
            for e in s["entries"]]


@pytest.mark.parametrize("rel", ["reports/leaderboard.json", "reports/in-context/leaderboard.json"])
def test_published_in_context_entries_carry_chance(rel):
    doc = _published(rel)
    entries = _in_context_entries(doc)
    assert entries, f"{rel} has no protocol: in_context entries"
    for e in entries:
        assert e["protocol"] == "in_context" and e["chance"]["mean"] is not None and e["chance"]["n"] == e["n_seeds"]
    # in-context entries are never in a section with fine-tuned ones
    for s in doc["streams"]:
        assert len({e["protocol"] for e in s["entries"]}) == 1, s["section"]


def test_hope_and_a_titans_variant_learn_in_context_on_unseen_tasks():
    # issue 16's bar: in-context plasticity >= chance + 0.2, mean over >= 3 seeds, at tiny
    doc = _published("reports/leaderboard.json")
    margin = {e["entry"]: e["metrics"]["plasticity"]["mean"] - e["chance"]["mean"]
              for e in _in_context_entries(doc) if e["n_seeds"] >= 3 and e["size"] == "tiny"}
    assert margin.get("hope/tiny/in_context/naive", 0) >= 0.2, margin
    assert max((m for k, m in margin.items() if k.startswith("titans")), default=0) >= 0.2, margin
