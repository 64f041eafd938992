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
