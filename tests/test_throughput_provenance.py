"""Throughput rows record the code that measured them: package versions (ray too) and the source
commit (nlbench.environment); schema v9 added ray_version and git_sha, and v8 files without them
still read (the columns null)."""

from importlib.metadata import version

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nlbench.bench.throughput import versions
from nlbench.environment import git_sha
from nlbench.results import SCHEMA_VERSION_KEY, ResultStore, schema_for

ROW = {"run_id": "r", "model": "hope", "size": "tiny", "seq_len": 8, "batch_size": 1, "phase": "train",
       "tokens_per_s": 10.0, "device": "cpu", "dtype": "float32"}


def test_throughput_provenance_columns():
    v = versions()
    assert v["ray_version"] == version("ray") and v["torch_version"] == torch.__version__
    assert v["git_sha"] == git_sha() and v["git_sha"]  # the tests run from a git checkout
    assert {"triton_version", "nlbench_version", "python_version"} <= set(v)


def test_v8_throughput_file_reads_with_ray_version_and_git_sha_null(tmp_path):
    full = schema_for("throughput")
    v8 = pa.schema([f for f in full if f.name not in ("ray_version", "git_sha")],
                   metadata={SCHEMA_VERSION_KEY: "8", "nlbench.table": "throughput"})
    (tmp_path / "throughput").mkdir()
    pq.write_table(pa.Table.from_pylist([ROW], schema=v8), tmp_path / "throughput" / "old.parquet")
    store = ResultStore(tmp_path)
    store.write_rows("throughput", [{**ROW, "run_id": "s", **versions()}], key="new")
    df = store.read("throughput").set_index("run_id")
    assert pd.isna(df.loc["r", "ray_version"]) and pd.isna(df.loc["r", "git_sha"])
    assert df.loc["s", "ray_version"] == version("ray") and df.loc["s", "git_sha"] == git_sha()
