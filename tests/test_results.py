"""Parquet results store: schemas, atomic replace under SIGKILL, idempotence, clear errors."""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nlbench.results import (
    SCHEMA_VERSION, SCHEMA_VERSION_KEY, TABLES, ResultsError, ResultStore, RunRecord, run_id_for, schema_for,
)

WHEN = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
SAMPLE = {"str": "x", "int": 7, "float": 1.5, "bool": True, "ts": WHEN, "json": {"k": [1, 2]}}
STORED = {**SAMPLE, "json": '{"k":[1,2]}'}


def full_row(table, **over):
    row = {c.name: (c.allowed[0] if c.allowed else SAMPLE[c.kind]) for c in TABLES[table]}
    return {**row, **over}


def run_record(run_id, n=3, status="completed", value=0.5, **run):
    base = dict(run_id=run_id, model="hope", stream="markov-languages", seed=0, protocol="finetune",
                strategy="naive", status=status, config={"lr": 1e-3})
    matrix = [dict(after_task=a, eval_task=e, metric="accuracy", value=value, tokens_seen=100 * (a + 1))
              for a in range(-1, n) for e in range(n)]
    curves = [dict(train_task=0, tokens_seen=t, eval_task=0, metric="loss", value=value) for t in (0, 10)]
    return RunRecord({**base, **run}, matrix, curves)


def hidden(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".")) if d.is_dir() else []


@pytest.mark.parametrize("table", sorted(TABLES))
def test_schema_round_trip_every_column(tmp_path, table):
    store = ResultStore(tmp_path)
    row = full_row(table)
    path = store.write_rows(table, [row], key="k1")
    assert path == tmp_path / table / "k1.parquet"
    meta = pq.read_schema(path).metadata
    assert meta[SCHEMA_VERSION_KEY.encode()] == str(SCHEMA_VERSION).encode() and meta[b"nlbench.table"] == table.encode()
    got = store.read_arrow(table)
    assert got.schema.equals(schema_for(table), check_metadata=True)
    expected = {c.name: (c.allowed[0] if c.allowed else STORED[c.kind]) for c in TABLES[table]}
    assert got.to_pylist() == [expected]
    df = store.read(table)
    kinds = {c.name: c.kind for c in TABLES[table]}
    assert list(df.columns) == list(kinds)
    for name, kind in kinds.items():
        want = {"int": "int64", "float": "float64", "bool": "bool", "ts": "datetime64[us, UTC]"}.get(kind)
        if want:
            assert str(df[name].dtype) == want, name
    whole = pd.read_parquet(tmp_path / table)
    assert list(whole.columns) == list(kinds) and len(whole) == 1


def test_empty_table_has_the_columns(tmp_path):
    for table in TABLES:
        df = ResultStore(tmp_path).read(table)
        assert df.empty and list(df.columns) == [c.name for c in TABLES[table]]


def test_timestamps_json_and_numbers_are_normalized(tmp_path):
    store = ResultStore(tmp_path)
    row = full_row("runs", started_at="2026-01-02T05:04:05.678901+02:00", finished_at=WHEN.timestamp(),
                   seed=3.0, config='{"already": "json"}', chance=(0.1, 0.25), error=None)
    store.write_rows("runs", [row], key="r")
    got = store.read_arrow("runs").to_pylist()[0]
    assert got["started_at"] == WHEN and got["finished_at"] == WHEN
    assert got["seed"] == 3 and got["config"] == '{"already": "json"}' and got["chance"] == "[0.1,0.25]"
    assert got["error"] is None


def test_bad_rows_get_clear_errors(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(ResultsError, match=r"runs\.status: row 0 holds 'done'; allowed values are \['completed', 'failed', 'diverged'\]"):
        store.write_rows("runs", [full_row("runs", status="done")], key="r")
    with pytest.raises(ResultsError, match=r"runs\.seed: row 1 holds 2\.5 \(float\); expected an integer"):
        store.write_rows("runs", [full_row("runs"), full_row("runs", seed=2.5)], key="r")
    with pytest.raises(ResultsError, match=r"unknown column\(s\) \['colour'\]"):
        store.write_rows("matrix", [{**full_row("matrix"), "colour": 1}], key="r")
    with pytest.raises(ResultsError, match=r"matrix\.eval_task is required"):
        store.write_rows("matrix", [full_row("matrix", eval_task=None)], key="r")
    with pytest.raises(ResultsError, match=r"unknown results table 'run'"):
        store.write_rows("run", [], key="r")
    with pytest.raises(ResultsError, match="not usable as a file name"):
        store.write_rows("runs", [full_row("runs")], key="../escape")
    with pytest.raises(ResultsError, match=r"runs\.config: row 0 holds '\{not json'"):
        store.write_rows("runs", [full_row("runs", config="{not json")], key="r")
    assert not (tmp_path / "runs").exists() or store.files("runs") == []


def test_write_run_validates_before_touching_any_file(tmp_path):
    store = ResultStore(tmp_path)
    store.write_run(run_record("a", value=0.1))
    before = (tmp_path / "matrix" / "a.parquet").read_bytes()
    with pytest.raises(ResultsError, match=r"runs\.status"):
        store.write_run(run_record("a", value=0.9, status="exploded"))
    assert (tmp_path / "matrix" / "a.parquet").read_bytes() == before
    bad = run_record("a")
    bad.matrix[0]["seed"] = 5
    with pytest.raises(ResultsError, match="matrix row 0 has seed=5 but the run has seed=0"):
        store.write_run(bad)


def test_rewriting_a_run_is_idempotent(tmp_path):
    store = ResultStore(tmp_path)
    store.write_run(run_record("a", n=3, status="failed", value=0.1))
    store.write_run(run_record("a", n=2, value=0.7))
    store.write_run(run_record("a", n=2, value=0.7))
    runs, matrix, curves = store.read("runs"), store.read("matrix"), store.read("curves")
    assert runs.run_id.tolist() == ["a"] and runs.status.tolist() == ["completed"]
    assert len(matrix) == 3 * 2 and set(matrix.value) == {0.7} and set(matrix.run_id) == {"a"}
    assert len(curves) == 2 and set(matrix.model) == {"hope"}  # filled in from the run row
    for table in ("runs", "matrix", "curves"):
        assert [p.name for p in (tmp_path / table).iterdir()] == ["a.parquet"]  # no temp files left
    assert store.completed_run_ids() == {"a"}


def test_completed_run_ids_only_counts_completed(tmp_path):
    store = ResultStore(tmp_path)
    store.write_run(run_record("ok"))
    store.write_run(run_record("bad", status="diverged", error="loss is NaN at step 12"))
    assert store.completed_run_ids() == {"ok"}
    assert set(pd.read_parquet(tmp_path / "runs").run_id) == {"ok", "bad"}


def test_appending_a_run_leaves_earlier_files_alone(tmp_path):
    store = ResultStore(tmp_path)
    store.write_run(run_record("first"))
    files = [tmp_path / t / "first.parquet" for t in ("runs", "matrix", "curves")]
    before = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
    time.sleep(0.01)
    store.write_run(run_record("second"))
    store.write_rows("throughput", [full_row("throughput")], key="bench-1")
    after = [(os.stat(p).st_ino, os.stat(p).st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
    assert after == before
    assert sorted(store.read("runs").run_id) == ["first", "second"]


def test_corrupt_file_error_names_it(tmp_path):
    store = ResultStore(tmp_path)
    store.write_run(run_record("good"))
    store.write_run(run_record("cut"))
    cut = tmp_path / "matrix" / "cut.parquet"
    cut.write_bytes(cut.read_bytes()[:-20])  # truncated: footer gone
    with pytest.raises(ResultsError, match=r"matrix/cut\.parquet is corrupt"):
        store.read("matrix")
    junk = tmp_path / "runs" / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ResultsError, match=r"runs/junk\.parquet is corrupt"):
        store.read("runs")
    # for a sweep both are incomplete runs, to recompute (not errors)
    done, damaged = store.check_runs()
    assert done == {"good"} and set(damaged) == {"cut", "junk"}
    assert "cut.parquet is corrupt" in damaged["cut"] and "junk.parquet is corrupt" in damaged["junk"]


def test_v1_throughput_file_reads_with_compile_mode_null(tmp_path):
    """Schema v2 added throughput.compile_mode: a v1 file (without it) still reads, the column
    null; a v2 file without it is refused as incomplete."""
    store = ResultStore(tmp_path)
    full = schema_for("throughput")
    v1 = pa.schema([f for f in full if f.name != "compile_mode"],
                   metadata={SCHEMA_VERSION_KEY: "1", "nlbench.table": "throughput"})
    row = {"run_id": "r", "model": "hope", "size": "tiny", "seq_len": 8, "batch_size": 1, "phase": "train",
           "tokens_per_s": 10.0, "device": "cpu", "dtype": "float32"}
    (tmp_path / "throughput").mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=v1), tmp_path / "throughput" / "old.parquet")
    store.write_rows("throughput", [{**row, "run_id": "s", "compile_mode": "max-autotune"}], key="new")
    df = store.read("throughput").set_index("run_id")
    assert pd.isna(df.loc["r", "compile_mode"]) and df.loc["s", "compile_mode"] == "max-autotune"
    v2 = v1.with_metadata({SCHEMA_VERSION_KEY: str(SCHEMA_VERSION), "nlbench.table": "throughput"})
    pq.write_table(pa.Table.from_pylist([row], schema=v2), tmp_path / "throughput" / "old.parquet")
    with pytest.raises(ResultsError, match=r"old\.parquet lacks column 'compile_mode'"):
        store.read("throughput")


def test_future_schema_version_is_refused(tmp_path):
    store = ResultStore(tmp_path)
    store.write_run(run_record("now"))
    future = schema_for("runs").with_metadata({SCHEMA_VERSION_KEY: str(SCHEMA_VERSION + 1), "nlbench.table": "runs"})
    pq.write_table(future.empty_table(), tmp_path / "runs" / "later.parquet")
    with pytest.raises(ResultsError, match=rf"runs/later\.parquet has schema version {SCHEMA_VERSION + 1}, newer"):
        store.read("runs")
    foreign = pa.table({"run_id": ["x"]})
    pq.write_table(foreign, tmp_path / "runs" / "later.parquet")
    with pytest.raises(ResultsError, match=r"later\.parquet has no nlbench\.schema_version metadata"):
        store.read("runs")


def test_hidden_temp_files_are_ignored(tmp_path):
    store = ResultStore(tmp_path)
    store.write_run(run_record("a"))
    (tmp_path / "runs" / ".b.parquet.abc123.tmp").write_bytes(b"PAR1 half a file")
    (tmp_path / "runs" / ".c.parquet").write_bytes(b"PAR1 hidden, whatever its suffix")
    assert store.read("runs").run_id.tolist() == ["a"]
    assert pd.read_parquet(tmp_path / "runs").run_id.tolist() == ["a"]


def test_trials_dynamic_param_columns(tmp_path):
    store = ResultStore(tmp_path)
    common = dict(study="hope-lr", state="complete", direction="maximize", objective="acc_final")
    store.write_rows("trials", [
        dict(common, trial=0, value=0.5, param_lr=1e-3, param_layers=2, param_opt="muon"),
        dict(common, trial=1, value=0.6, param_lr=3e-3, param_layers=4, param_opt="m3"),
    ], key="hope-lr")
    store.write_rows("trials", [
        dict(common, study="tf", trial=0, state="pruned", param_lr=1, param_warmup=True, param_choice=None),
        dict(common, study="tf", trial=1, param_lr=2, param_warmup=False, param_choice=[1, "a"]),
    ], key="tf")
    df = store.read("trials").sort_values(["study", "trial"])
    assert [c for c in df.columns if c.startswith("param_")] == ["param_choice", "param_layers", "param_lr", "param_opt", "param_warmup"]
    assert df.param_lr.tolist() == [1e-3, 3e-3, 1.0, 2.0] and str(df.param_lr.dtype) == "float64"  # int + float -> float
    assert df.param_opt.tolist()[:2] == ["muon", "m3"] and df.param_opt.isna().tolist()[2:] == [True, True]
    assert df.param_choice.tolist()[3] == '[1,"a"]'
    assert pq.read_schema(tmp_path / "trials" / "tf.parquet").field("param_lr").type == pa.int64()
    with pytest.raises(ResultsError, match=r"unknown column\(s\) \['lr'\].*param_<name>"):
        store.write_rows("trials", [dict(common, trial=2, lr=0.1)], key="x")


def test_run_id_is_a_short_hash_of_canonical_json():
    a = run_id_for({"b": 1, "a": [1, 2], "c": {"y": 1, "x": 2}})
    assert a == hashlib.sha256(b'{"a":[1,2],"b":1,"c":{"x":2,"y":1}}').hexdigest()[:16]
    assert a == run_id_for({"c": {"x": 2, "y": 1}, "a": [1, 2], "b": 1})
    assert run_id_for({"a": [2, 1], "b": 1, "c": {"x": 2, "y": 1}}) != a
    with pytest.raises(TypeError, match="cannot encode object"):
        run_id_for({"a": object()})


WRITER = """
import sys
from nlbench.results import ResultStore, RunRecord

out, n = sys.argv[1], int(sys.argv[2])
store = ResultStore(out)

def record(run_id, v):
    run = dict(run_id=run_id, model="m", stream="s", seed=0, protocol="finetune", strategy="naive",
               status="completed", config={"v": v})
    matrix = [dict(after_task=i // 50 - 1, eval_task=i % 50, metric="accuracy", value=float(v), tokens_seen=i)
              for i in range(n)]
    return RunRecord(run, matrix, [])

store.write_run(record("base", -1))
print("ready", flush=True)
i = 0
while True:  # rewrite three runs over and over until killed
    store.write_run(record(f"r{i % 3}", i))
    i += 1
"""


def _temp_files(dirs):
    """Hidden temp files in ``dirs`` with their sizes (they may vanish while we look)."""
    found = {}
    for d in dirs:
        for name in hidden(d):
            with contextlib.suppress(FileNotFoundError):
                found[d / name] = os.stat(d / name).st_size
    return found


def test_sigkill_mid_write_leaves_a_readable_dataset(tmp_path):
    n = 60_000
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "out"
    dirs = [out / "matrix", out / "runs"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    torn = None
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(n)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            old = set(_temp_files(dirs))
            deadline = time.monotonic() + 15
            # busy-wait: the window between the first bytes of a temp file and its rename is milliseconds
            while time.monotonic() < deadline and not any(
                size > 0 for p, size in _temp_files(dirs).items() if p not in old
            ):
                pass
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        torn = [p for p, size in _temp_files(dirs).items() if p not in old and size > 0]

        matrix = pd.read_parquet(out / "matrix")  # the dataset reads whole, temp files skipped
        runs = pd.read_parquet(out / "runs")
        per_run = matrix.groupby("run_id")["value"].agg(["size", "nunique"])
        assert (per_run["size"] == n).all() and (per_run["nunique"] == 1).all()  # no partial or mixed files
        assert runs.run_id.is_unique and set(runs.run_id) <= set(per_run.index)  # runs row written after matrix
        store = ResultStore(out)
        assert len(store.read("matrix")) == n * len(per_run) and "base" in store.completed_run_ids()
        if torn:
            break
    # the kill landed between a temp file's first bytes and its rename (the file is serialized in
    # memory and written in one call, so it may be complete or partial): readers never saw it
    assert torn, "never caught the writer with an unrenamed temp file"
