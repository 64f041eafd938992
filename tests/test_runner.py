"""execute_run: every runs column, failures and divergence as records, determinism,
checkpoint resume equal to an undisturbed run; run_sequential idempotence."""

import json
import math
from pathlib import Path

import pytest
import torch

from nlbench.config import apply_override, expand_runs, spec_from_config, validate_config
from nlbench.results import TABLES, ResultsError, ResultStore
from nlbench.runner import STOPPED, checkpoint_path, execute_run, run_sequential

torch.set_num_threads(1)


def spec_for(model="transformer", strategy="naive", protocol="finetune", tokens_per_task=16 * 4 * 3, **train):
    raw = dict(
        models=[model],
        streams=[dict(name="markov-languages", num_tasks=3, seq_len=16,
                      options=dict(vocab_size=16, order=1, branching=2, eval_size=8))],
        seeds=[1], protocol=protocol, strategy=strategy,
        replay=dict(buffer_size=8, ratio=0.5), ewc=dict(lam=10.0, fisher_samples=2),
        train=dict(tokens_per_task=tokens_per_task, batch_size=4, device="cpu", eval_every=128,
                   optimizer=dict(name="adamw", lr=3e-3), **train),
        eval=dict(max_sequences=8, batch_size=8),
    )
    return expand_runs(validate_config(raw))[0]


def matrix_of(record):
    return sorted((r["after_task"], r["eval_task"], r["metric"], r["value"], r["tokens_seen"]) for r in record.matrix)


def test_record_fills_every_runs_column(tmp_path):
    spec = spec_for()
    rec = execute_run(spec, device="cpu", threads=1)
    run = rec.run
    assert run["status"] == "completed" and run["error"] is None
    for col in TABLES["runs"]:
        # git_sha: None outside a git checkout; pretrain: none named; node_id: set by the Ray actor
        if col.name not in ("git_sha", "error", "pretrain", "node_id"):
            assert run[col.name] is not None, col.name
    assert run["run_id"] == spec.run_id and run["model"] == "transformer" and run["seed"] == 1
    assert json.loads(run["config"]) == spec.config
    assert len(json.loads(run["chance"])) == 3 and all(0 < c < 1 for c in json.loads(run["chance"]))
    assert run["params"] > 0 and run["train_tokens_per_s"] > 0
    assert run["wall_s"] >= run["train_s"] + run["eval_s"] > 0
    assert set(json.loads(run["versions"])) >= {"python", "nlbench", "torch", "ray"}
    assert set(run) == {c.name for c in TABLES["runs"]}
    assert len(rec.matrix) == 4 * 3 * 2 and rec.curves
    assert all(r["run_id"] == spec.run_id and r["stream"] == "markov-languages" for r in rec.matrix + rec.curves)
    store = ResultStore(tmp_path)   # the record passes the store's schema validation
    store.write_run(rec)
    assert len(store.read("matrix")) == len(rec.matrix) and len(store.read("curves")) == len(rec.curves)


def test_same_config_and_seed_give_identical_matrix():
    spec = spec_for(strategy="replay")
    a, b = execute_run(spec, device="cpu"), execute_run(spec, device="cpu")
    assert matrix_of(a) == matrix_of(b)
    assert sorted(map(str, a.curves)) == sorted(map(str, b.curves))


@pytest.mark.parametrize("strategy", ["replay", "ewc", "joint", "fresh"])
def test_resume_from_checkpoint_equals_undisturbed_run(tmp_path, strategy):
    spec = spec_for(strategy=strategy)
    full = execute_run(spec, device="cpu")
    stopped = execute_run(spec, checkpoint_dir=tmp_path, device="cpu", stop_after_task=0)
    assert stopped.run["status"] == STOPPED and stopped.run["error"] is None
    with pytest.raises(ResultsError, match="status"):  # an unfinished run is never a results row
        ResultStore(tmp_path / "out").write_run(stopped)
    assert checkpoint_path(tmp_path, spec.run_id).is_file()
    assert {r["after_task"] for r in stopped.matrix} == {-1, 0}
    resumed = execute_run(spec, checkpoint_dir=tmp_path, device="cpu")
    assert resumed.run["status"] == "completed"
    assert matrix_of(resumed) == matrix_of(full)
    assert sorted(map(str, resumed.curves)) == sorted(map(str, full.curves))
    assert not checkpoint_path(tmp_path, spec.run_id).exists()  # removed once finished


def test_resume_in_context_carries_fast_state(tmp_path):
    spec = spec_for(model="titans-lmm", protocol="in_context", tokens_per_task=16 * 4 * 2)
    full = execute_run(spec, device="cpu")
    execute_run(spec, checkpoint_dir=tmp_path, device="cpu", stop_after_task=1)
    resumed = execute_run(spec, checkpoint_dir=tmp_path, device="cpu")
    assert resumed.run["status"] == "completed" and matrix_of(resumed) == matrix_of(full)


def test_divergence_is_a_record_not_a_crash():
    spec = spec_for(grad_clip=None)
    cfg = apply_override(spec.config, "train.optimizer", dict(name="muon", lr=1e6, adamw_lr=1e6))
    rec = execute_run(spec_from_config(cfg), device="cpu")
    assert rec.run["status"] == "diverged"
    assert "diverged at step" in rec.run["error"] and "non-finite" in rec.run["error"]
    assert {r["after_task"] for r in rec.matrix} >= {-1}


def test_failure_is_a_record_with_traceback():
    spec = spec_for()
    cfg = apply_override(spec.config, "stream.options.order", 7)  # the stream builder rejects it
    rec = execute_run(spec_from_config(cfg), device="cpu")
    assert rec.run["status"] == "failed"
    assert "order" in rec.run["error"] and "Traceback" in rec.run["error"]
    assert rec.matrix == [] and rec.run["wall_s"] >= 0 and rec.run["finished_at"] is not None


def test_run_sequential_writes_store_and_skips_completed(tmp_path):
    specs = [spec_for(), spec_for(strategy="ewc")]
    recs = run_sequential(specs, tmp_path, device="cpu", threads=1)
    assert [r.run["status"] for r in recs] == ["completed", "completed"]
    store = ResultStore(tmp_path)
    assert store.completed_run_ids() == {s.run_id for s in specs}
    runs = store.read("runs")
    assert len(runs) == 2 and not math.isnan(runs["train_s"].sum())
    mtime = [p.stat().st_mtime_ns for p in store.files("runs")]
    assert run_sequential(specs, tmp_path, device="cpu") == []   # idempotent: nothing re-runs
    assert [p.stat().st_mtime_ns for p in store.files("runs")] == mtime


class _Planted:
    """A pickle that would create a file when unpickled (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_pickle_checkpoint_is_refused_without_running(tmp_path):
    spec = spec_for(strategy="naive")
    marker = tmp_path / "planted-code-ran"
    ckpt = checkpoint_path(tmp_path / "ck", spec.run_id)
    ckpt.parent.mkdir(parents=True)
    torch.save({"run_id": spec.run_id, "protocol_state": _Planted(marker)}, ckpt)
    rec = execute_run(spec, checkpoint_dir=tmp_path / "ck", device="cpu")
    assert not marker.exists()
    assert rec.run["status"] == "failed"
    assert "refused" in rec.run["error"] and "Nothing in it was run" in rec.run["error"]


def test_another_runs_checkpoint_is_refused(tmp_path):
    spec = spec_for(strategy="naive")
    ckpt = checkpoint_path(tmp_path, spec.run_id)
    ckpt.parent.mkdir(parents=True)
    torch.save({"run_id": "someone-else", "protocol_state": {}}, ckpt)
    rec = execute_run(spec, checkpoint_dir=tmp_path, device="cpu")
    assert rec.run["status"] == "failed" and "belongs to run 'someone-else'" in rec.run["error"]


def test_run_row_is_the_runs_table_and_failed_records_use_it(tmp_path):
    # the runner's rows and the records of runs that never returned (execution.failed_record)
    # are built by one function over one TypedDict, which must name exactly the table's columns
    from nlbench.execution import failed_record
    from nlbench.results import RunRow, run_row

    assert list(RunRow.__annotations__) == [c.name for c in TABLES["runs"]]
    with pytest.raises(ResultsError, match="unknown runs column"):
        run_row(run_id="x", gpu="H200")
    spec = spec_for()
    rec = failed_record(spec, "actor died 3 times")
    assert set(rec.run) == {c.name for c in TABLES["runs"]}
    assert rec.run["status"] == "failed" and rec.run["error"] == "actor died 3 times"
    assert {"python", "nlbench", "torch", "ray"} <= set(rec.run["versions"])
    store = ResultStore(tmp_path)
    store.write_run(rec)
    back = store.read("runs")
    assert back["run_id"].tolist() == [spec.run_id] and back["status"].tolist() == ["failed"]
