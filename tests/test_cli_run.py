"""`nlbench run`: a tiny config with --sequential writes OUT's tables and prints the summary;
a bad config exits with code 2, names the field and writes nothing."""

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from nlbench.cli import main

torch.set_num_threads(1)

TINY = dict(
    name="tiny",
    models=["transformer"],
    streams=[dict(name="markov-languages", num_tasks=2, seq_len=16,
                  options=dict(vocab_size=16, order=1, branching=2, eval_size=8))],
    seeds=[0, 1],
    train=dict(tokens_per_task=16 * 4 * 15, batch_size=4, device="cpu", optimizer=dict(name="adamw", lr=3e-3)),
    eval=dict(max_sequences=8, batch_size=8),
)


def write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_run_sequential_writes_tables_and_prints_summary(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", write(tmp_path, TINY), "--out", str(out), "--sequential"])
    assert res.exit_code == 0, res.output
    runs = pd.read_parquet(out / "runs")
    assert len(runs) == 2 and set(runs["status"]) == {"completed"} and set(runs["seed"]) == {0, 1}
    matrix = pd.read_parquet(out / "matrix")
    assert len(matrix) == 2 * 3 * 2 * 2  # runs × (b row + 2 tasks) × 2 eval tasks × 2 metrics
    assert not (out / "checkpoints").exists()
    for word in ("ACC", "BWT", "forgetting", "plasticity", "did not learn", "transformer", "markov-languages",
                 "completed 2"):
        assert word in res.output, word
    # the table row: n seeds 2, and the model learned (0 of 2 runs flagged)
    row = next(line for line in res.output.splitlines() if line.startswith("│ transformer"))
    assert "0/2" in row and " 2 " in row

    again = CliRunner().invoke(main, ["run", write(tmp_path, TINY), "--out", str(out), "--sequential"])
    assert again.exit_code == 0 and "2 run(s) already completed" in again.output


def test_only_selects_runs(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", write(tmp_path, TINY), "--out", str(out), "--sequential",
                                    "--only", "*/seed1"])
    assert res.exit_code == 0, res.output
    assert list(pd.read_parquet(out / "runs")["seed"]) == [1]
    res = CliRunner().invoke(main, ["run", write(tmp_path, TINY), "--out", str(out), "--sequential",
                                    "--only", "hope"])
    assert res.exit_code == 2 and "matches none" in res.output


@pytest.mark.parametrize("change, field, allowed", [
    (dict(models=["gpt2"]), "models.0.name", "'transformer'"),
    (dict(protocol="online"), "protocol.0", "'in_context'"),
    (dict(train=dict(tokens_per_task=-1)), "train.tokens_per_task", "greater than or equal to 1"),
])
def test_bad_config_exits_2_names_field_writes_nothing(tmp_path, change, field, allowed):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", write(tmp_path, {**TINY, **change}), "--out", str(out), "--sequential"])
    assert res.exit_code == 2
    assert f"'{field}'" in res.output and allowed in res.output
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path):
    res = CliRunner().invoke(main, ["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"), "--sequential"])
    assert res.exit_code == 2 and "does not exist" in res.output and not (tmp_path / "o").exists()


def test_deleted_or_corrupt_table_file_is_recomputed_and_said(tmp_path):
    out = tmp_path / "out"
    cfg = write(tmp_path, TINY)
    assert CliRunner().invoke(main, ["run", cfg, "--out", str(out), "--sequential"]).exit_code == 0
    before = pd.read_parquet(out / "matrix").sort_values(["run_id", "after_task", "eval_task", "metric"])
    first, second = sorted(p.stem for p in (out / "runs").iterdir())
    (out / "matrix" / f"{first}.parquet").unlink()  # what the corrupt-file error used to advise
    cut = out / "curves" / f"{second}.parquet"
    cut.write_bytes(cut.read_bytes()[:-20])

    res = CliRunner().invoke(main, ["run", cfg, "--out", str(out), "--sequential"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "recomputing transformer/markov-languages/finetune/naive/seed" in text
    assert f"({first}): its matrix file" in text and "is missing" in text
    assert f"({second}): results file" in text and "is corrupt" in text
    assert "already completed" not in res.output  # both ran again
    after = pd.read_parquet(out / "matrix").sort_values(["run_id", "after_task", "eval_task", "metric"])
    pd.testing.assert_frame_equal(before.reset_index(drop=True), after.reset_index(drop=True))
    from nlbench.results import ResultStore

    store = ResultStore(out)
    store.read("curves")  # the corrupt file was replaced
    assert store.check_runs() == ({first, second}, {}) and len(store.read("runs")) == 2


@pytest.mark.slow  # several `nlbench run --sequential` processes (~15 s of CPU)
def test_sequential_uses_the_runs_cpu_share_as_torch_threads(tmp_path):
    from nlbench.environment import available_cpus

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch would use by default on a 2-core machine
    try:
        for cpus, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
            cfg = dict(TINY, seeds=[0], resources=dict(cpus_per_run=cpus))
            res = CliRunner().invoke(main, ["run", write(tmp_path, cfg), "--out", str(out), "--sequential"])
            assert res.exit_code == 0, res.output
            want = min(cpus, available_cpus())
            assert f"torch uses {want} thread(s)" in res.output
            assert list(pd.read_parquet(out / "runs")["device"]) == [f"cpu:{want}threads"]
    finally:
        torch.set_num_threads(threads)
