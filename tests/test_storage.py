"""OUT on object storage (nlbench.storage) against a real S3-compatible server (moto's standalone
server, started here on 127.0.0.1 and stopped by pid), plus local writes: whole objects, the
umask's file mode, a corrupt object named in a clean error, `run --out s3://…` then `report s3://…`."""

import os
import re
import socket
import subprocess
import sys
import time

import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml
from click.testing import CliRunner

from nlbench.results import ResultsError, ResultStore, RunRecord
from nlbench.storage import (StorageError, check_writable, delete_blob, local_dir, location, read_blob,
                             write_blob)

pytest.importorskip("moto")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1:<free port>; yields 'host:port'. AWS credentials via env vars."""
    port = _free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, request):
    """A fresh bucket; returns a function prefix -> s3 URI on it (endpoint in the URI, keys in env)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = ("b-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()))[:50].strip("-")
    query = f"endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir(bucket)
    return lambda prefix="": f"s3://{bucket}/{prefix}?{query}".replace("/?", "?")


def _record(run_id, value):
    run = dict(run_id=run_id, model="m", stream="s", seed=0, protocol="finetune", strategy="naive",
               status="completed", config={"v": value})
    matrix = [dict(after_task=0, eval_task=0, metric="accuracy", value=float(value), tokens_seen=1)]
    return RunRecord(run, matrix, [])


def test_result_store_on_s3_writes_reads_and_rewrites_whole_objects(s3):
    uri = s3("out")
    store = ResultStore(uri)
    store.write_run(_record("r1", 0.25))
    store.write_run(_record("r1", 0.5))  # a re-run replaces the object: one row, the new value
    store.write_run(_record("r2", 0.75))
    again = ResultStore(uri)
    matrix = again.read("matrix")
    assert sorted(zip(matrix.run_id, matrix.value)) == [("r1", 0.5), ("r2", 0.75)]
    assert again.completed_run_ids() == {"r1", "r2"}
    assert [f.split("?")[0].rsplit("/", 2)[-2:] for f in again.files("runs")] == [["runs", "r1.parquet"],
                                                                                    ["runs", "r2.parquet"]]
    # nothing was written outside the prefix and no local directory named 's3:' appeared
    assert not os.path.exists("s3:")
    loc = location(uri)
    assert sorted(loc.list("matrix")) == ["r1.parquet", "r2.parquet"]


def test_corrupt_object_is_a_clean_error_naming_it(s3):
    uri = s3("out")
    store = ResultStore(uri)
    store.write_run(_record("r1", 0.25))
    write_blob(uri, "matrix/r1.parquet", b"not parquet at all")
    with pytest.raises(ResultsError, match=r"s3://.*/out/matrix/r1\.parquet is corrupt"):
        store.read("matrix")
    completed, damaged = store.check_runs()  # the run becomes incomplete again (recomputed next time)
    assert completed == set() and "r1" in damaged
    delete_blob(uri, "matrix/r1.parquet")
    completed, damaged = store.check_runs()
    assert completed == set() and "missing" in damaged["r1"]


def test_blobs_round_trip_and_check_writable(s3, s3_endpoint):
    uri = s3("blobs")
    assert check_writable(uri).list() == []  # the probe object is gone again
    write_blob(uri, "a/b.bin", b"\x00\x01")
    assert read_blob(uri, "a/b.bin") == b"\x00\x01"
    assert delete_blob(uri, "a/b.bin") and not delete_blob(uri, "a/b.bin")
    with pytest.raises(FileNotFoundError):
        read_blob(uri, "a/b.bin")
    with pytest.raises(StorageError, match="not writable"):
        check_writable(f"s3://no-such-bucket/x?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1")


def test_bad_locations_are_clean_errors(tmp_path):
    with pytest.raises(StorageError, match="unsupported storage scheme 'foo'"):
        location("foo://bar")
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        check_writable(tmp_path / "f")
    with pytest.raises(StorageError, match="not writable"):
        check_writable(tmp_path / "f" / "under")
    assert location(f"file://{tmp_path}").local and location(f"file://{tmp_path}").root == str(tmp_path)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_local_files_take_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = ResultStore(tmp_path).write_rows("matrix", _record("r", 1).matrix and [
            dict(run_id="r", model="m", stream="s", seed=0, after_task=0, eval_task=0, metric="accuracy")], key="r")
        write_blob(tmp_path, "x/blob", b"1")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode
    assert os.stat(tmp_path / "x" / "blob").st_mode & 0o777 == mode
    assert [n for n in os.listdir(tmp_path / "matrix") if n.startswith(".")] == []  # no temp file left


def test_local_dir_is_out_for_a_path_and_a_cache_for_a_uri(tmp_path, s3):
    assert local_dir(tmp_path, "checkpoints") == str(tmp_path / "checkpoints")
    a, b = local_dir(s3("x"), "checkpoints"), local_dir(s3("y"), "checkpoints")
    assert a != b and os.path.isabs(a) and not a.startswith("s3:")


TINY = dict(
    name="tiny-s3",
    models=["transformer"],
    streams=[dict(name="markov-languages", num_tasks=2, seq_len=16,
                  options=dict(vocab_size=16, order=1, branching=2, eval_size=8))],
    seeds=[0],
    train=dict(tokens_per_task=16 * 4 * 5, batch_size=4, device="cpu", optimizer=dict(name="adamw", lr=3e-3)),
    eval=dict(max_sequences=8, batch_size=8),
)


@pytest.mark.parametrize("how", [pytest.param("--sequential", marks=pytest.mark.slow),
                                 pytest.param("ray", marks=pytest.mark.ray)])
def test_run_then_report_on_s3(tmp_path, s3, monkeypatch, how):
    from nlbench.cli import main

    monkeypatch.chdir(tmp_path)  # a stray local 's3:' directory would appear here
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    uri = s3("results/tiny")
    flags = ["--sequential"] if how == "--sequential" else []
    res = CliRunner().invoke(main, ["run", str(cfg), "--out", uri, *flags])
    assert res.exit_code == 0, res.output
    runs = ResultStore(uri).read("runs")
    assert list(runs.status) == ["completed"]
    again = CliRunner().invoke(main, ["run", str(cfg), "--out", uri, "--sequential"])
    assert again.exit_code == 0 and "1 run(s) already completed" in again.output, again.output
    assert ResultStore(uri).read("runs").run_id.tolist() == runs.run_id.tolist()  # idempotent: no new row
    rep = CliRunner().invoke(main, ["report", uri, "--no-figures", "--format", "md"])
    assert rep.exit_code == 0, rep.output
    md = read_blob(uri, "report/leaderboard.md").decode()
    assert "transformer" in md and "markov-languages" in md
    assert os.listdir(tmp_path) == ["c.yaml"]  # nothing local: no 's3:' directory, no checkpoints
    assert pd.read_parquet(location(uri).join("matrix"), filesystem=location(uri).fs).shape[0] == 3 * 2 * 2
