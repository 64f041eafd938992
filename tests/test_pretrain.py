"""Pretraining: seed spaces, compute-once reuse, bit-exact checkpoints and resume,
safe loading, probes that never write, the meta-continual and TBPTT mechanics."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from nlbench.config import ConfigError, expand_runs, validate_config
from nlbench.models import build_model
from nlbench.pretrain import (PRETRAIN_SEED_BASE, PretrainError, ensure_pretrained, executions, load_pretrained,
                              pretrain_key, pretrain_stream_seed, resolve_block)
from nlbench.pretrain.store import build_model_for
from nlbench.pretrain.tasks import MetaSequences, build_pretrain_stream
from nlbench.pretrain.train import build_optimizer_for, pretrain, train_step
from nlbench.runner import execute_run, run_sequential
from tests.conftest import tiny_config

BLOCK = dict(tasks=8, steps=3, batch_size=2, segments=3, segment_sequences=1, tbptt=2, probe_weight=0.5,
             checkpoint_every=1)
STREAM = dict(name="markov-languages", num_tasks=2, seq_len=16, options={})
HOPE_IC = dict(name="hope", size="tiny", label="hope", options=dict(cms_mode="in_context", cms_periods=[4, 8]))


def block(**kw):
    return resolve_block({**BLOCK, **kw}, STREAM, seed=0)


def pretrain_config(seeds=(0, 1), **kw):
    cfg = tiny_config(seeds=seeds, num_tasks=2, tokens_per_task=64, seq_len=16, **kw)
    cfg.setdefault("pretrain", dict(BLOCK))
    cfg["eval"] = {"max_sequences": 4, "batch_size": 4}
    cfg["train"]["batch_size"] = 2
    return cfg


# ----------------------------------------------------------------------------- seed spaces


def test_pretraining_seeds_are_disjoint_from_every_evaluated_seed_by_construction():
    for s in [0, 1, 2, 17, 2**31, 2**62 - 1]:
        assert PRETRAIN_SEED_BASE <= pretrain_stream_seed(s) < 2**63
    pool = build_pretrain_stream(resolve_block(dict(tasks=5), dict(name="associative-recall"), seed=0))
    # every family keys its generators by (stream seed, family, task): pretraining keys start >= 2^62
    assert all(t._seed_key[0] >= PRETRAIN_SEED_BASE for t in pool.tasks)
    fresh = resolve_block(dict(tasks="fresh", batch_size=2, segments=3), dict(name="associative-recall"), seed=0)
    meta = MetaSequences(build_pretrain_stream(fresh), fresh)
    ids = meta.plan(0)
    assert len(set(ids.ravel())) == 6 and not set(ids.ravel()) & set(meta.plan(1).ravel())
    tasks = [meta.task(t) for t in ids.ravel()]
    assert all(t._seed_key[0] >= PRETRAIN_SEED_BASE for t in tasks)
    assert len({tuple(t.info["value_of"]) for t in tasks}) == 6  # a new map per segment
    with pytest.raises(ConfigError, match=r"seeds must be integers in \[0, 2\^62\)"):
        validate_config(tiny_config(seeds=(PRETRAIN_SEED_BASE,)))
    # and the content differs from the evaluated tasks: no pretraining map equals an evaluated one
    from nlbench.tasks import build_stream

    evaluated = build_stream("associative-recall", num_tasks=5, seed=0)
    maps = {tuple(t.info["value_of"]) for t in evaluated.tasks}
    assert not maps & {tuple(t.info["value_of"]) for t in pool.tasks}
    assert not maps & {tuple(t.info["value_of"]) for t in tasks}


def test_block_resolves_to_the_runs_stream_and_seed_and_the_key_covers_model_and_block():
    b = resolve_block(dict(seed="run"), dict(name="markov-languages", seq_len=64, options={"eval_size": 8}), seed=3)
    assert b["stream"] == {"name": "markov-languages", "seq_len": 64, "options": {}} and b["seed"] == 3
    m = dict(name="hope", size="tiny", options={})
    k = pretrain_key(m, b)
    assert k != pretrain_key({**m, "size": "small"}, b) != pretrain_key({**m, "options": {"cms_lr": 0.1}}, b)
    assert k != pretrain_key(m, {**b, "steps": b["steps"] + 1}) and k != pretrain_key(m, {**b, "seed": 4})
    assert k == pretrain_key({**m, "label": "other"}, {**b, "checkpoint_every": 7})  # where, not what
    with pytest.raises(ConfigError, match=r"'pretrain.tasks'.*at most 8 tasks"):
        expand_runs(validate_config(tiny_config(streams=[{"name": "modular-arithmetic"}], pretrain={"tasks": 9})))
    with pytest.raises(ConfigError, match=r"pretrain.probe_weight"):
        validate_config(tiny_config(pretrain={"probe_weight": -1}))


def test_runs_without_a_pretrain_block_keep_their_ids():
    specs = expand_runs(validate_config(tiny_config()))
    assert all("pretrain" not in s.config for s in specs)
    assert specs[0].run_id == expand_runs(validate_config(tiny_config()))[0].run_id


# ----------------------------------------------------------------------------- compute once


def test_runs_naming_one_pretrain_compute_it_once_and_record_its_key(tmp_path):
    specs = expand_runs(validate_config(pretrain_config(protocol=["in_context", "finetune"])))
    assert len(specs) == 4
    records = run_sequential(specs, tmp_path)
    assert [r.run["status"] for r in records] == ["completed"] * 4, [r.run["error"] for r in records]
    key = pretrain_key(specs[0].config["model"], specs[0].config["pretrain"])
    assert {r.run["pretrain"] for r in records} == {key}
    assert executions(tmp_path / "pretrained", key) == 1
    import pandas as pd

    assert set(pd.read_parquet(tmp_path / "runs")["pretrain"]) == {key}


def test_seed_run_gives_one_pretraining_per_seed(tmp_path):
    specs = expand_runs(validate_config(pretrain_config(pretrain={**BLOCK, "seed": "run"})))
    run_sequential(specs, tmp_path)
    keys = {pretrain_key(s.config["model"], s.config["pretrain"]) for s in specs}
    assert len(keys) == 2 and all(executions(tmp_path / "pretrained", k) == 1 for k in keys)


@pytest.mark.ray
def test_a_sweep_computes_each_pretraining_once_as_a_ray_task(ray_session, tmp_path):
    from nlbench.execution import run_sweep

    specs = expand_runs(validate_config(pretrain_config(seeds=(0, 1, 2))))
    summary = run_sweep(specs, tmp_path, progress=False)
    assert summary["completed"] == 3, summary
    key = pretrain_key(specs[0].config["model"], specs[0].config["pretrain"])
    assert executions(tmp_path / "pretrained", key) == 1


# ----------------------------------------------------------------------------- checkpoints


def _train_in_process(model_entry, b):
    stream = build_pretrain_stream(b)
    model = build_model_for(model_entry, b, stream.vocab_size)
    pretrain(model, b, stream, torch.device("cpu"))
    return model


def test_checkpoint_round_trips_bit_exactly_and_equals_an_in_process_pretraining(tmp_path):
    b = block()
    path, computed = ensure_pretrained(HOPE_IC, b, tmp_path)
    assert computed and ensure_pretrained(HOPE_IC, b, tmp_path) == (path, False)
    trained = _train_in_process(HOPE_IC, b)
    V = trained.tok_emb.num_embeddings
    fresh = build_model("hope", vocab_size=V, **HOPE_IC["options"])
    meta = load_pretrained(path, pretrain_key(HOPE_IC, b), fresh)
    assert meta["key"] == pretrain_key(HOPE_IC, b) and len(meta["history"]) == b["steps"]
    for (n, p), (n2, q) in zip(trained.state_dict().items(), fresh.state_dict().items()):
        assert n == n2 and torch.equal(p, q), n
    x = torch.randint(0, V, (2, 16))
    assert torch.equal(trained.eval()(x).logits, fresh.eval()(x).logits)
    init = build_model_for(HOPE_IC, b, V)
    assert not torch.equal(init.tok_emb.weight, fresh.tok_emb.weight)  # pretraining moved the weights


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path):
    b = block()
    progress, _ = ensure_pretrained(HOPE_IC, b, tmp_path, stop_after_step=1)
    assert progress.name == "progress.pt" and progress.is_file()
    path, computed = ensure_pretrained(HOPE_IC, b, tmp_path)
    assert computed and not progress.exists()
    key = pretrain_key(HOPE_IC, b)
    assert executions(tmp_path, key) == 2
    resumed = build_model("hope", vocab_size=32, **HOPE_IC["options"])
    load_pretrained(path, key, resumed)
    straight = _train_in_process(HOPE_IC, b)
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_corrupt_or_foreign_checkpoints_are_clear_errors_and_never_execute_code(tmp_path):
    b = block()
    key = pretrain_key(HOPE_IC, b)
    model = build_model("hope", vocab_size=32, **HOPE_IC["options"])
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "nlbench-pretrained", "key": key, "state_dict": _Evil(marker)}, evil)
    with pytest.raises(PretrainError, match=r"cannot be read as tensors and plain data.*Nothing in it was executed"):
        load_pretrained(evil, key, model)
    assert not marker.exists()
    raw = tmp_path / "pickle.pt"
    raw.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(PretrainError, match="corrupt or was not written by nlbench"):
        load_pretrained(raw, key, model)
    assert not marker.exists()

    good, _ = ensure_pretrained(HOPE_IC, b, tmp_path / "store")
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PretrainError, match="corrupt"):
        load_pretrained(torn, key, model)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(PretrainError, match="not an nlbench pretrained checkpoint"):
        load_pretrained(plain, key, model)
    with pytest.raises(PretrainError, match="belongs to another model or pretrain config"):
        load_pretrained(good, "0" * 16, model)
    other = build_model("hope", vocab_size=40, **HOPE_IC["options"])
    with pytest.raises(PretrainError, match="does not fit this model"):
        load_pretrained(good, key, other)


def test_a_corrupt_checkpoint_fails_the_run_with_the_error(tmp_path):
    specs = expand_runs(validate_config(pretrain_config(seeds=(0,))))
    key = pretrain_key(specs[0].config["model"], specs[0].config["pretrain"])
    path = tmp_path / "pretrained" / key / "model.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    record = execute_run(specs[0], checkpoint_dir=tmp_path / "checkpoints")
    assert record.run["status"] == "failed" and "PretrainError" in record.run["error"]
    assert "corrupt or was not written by nlbench" in record.run["error"]


# ----------------------------------------------------------------------------- the loop


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("entry", [HOPE_IC, dict(name="titans-lmm", size="tiny", options={}),
                                   dict(name="transformer", size="tiny", options={"kv_window": 24})])
def test_probes_never_write_into_the_state_they_measure(entry):
    from nlbench.protocol.evaluate import evaluate_with_state

    torch.manual_seed(0)
    model = build_model(entry["name"], vocab_size=32, **entry["options"]).eval()
    x = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        state = model(x).state
        before = [t.clone() for t in _leaves(state)]
        out = model(torch.randint(0, 32, (2, 16)), state=state, update_state=False)
        evaluate_with_state(model, (torch.randint(0, 32, (5, 16)), torch.randint(0, 32, (5, 16))), state, streams=2,
                            max_sequences=None, device=torch.device("cpu"))
    assert out.state is state
    assert all(torch.equal(a, b) for a, b in zip(before, _leaves(state)))


def _leaves(state):
    out = []
    from nlbench.models.base import map_state

    map_state(lambda t: out.append(t) or t, state)
    return out


def test_meta_continual_probes_add_loss_but_do_not_change_the_state_carried(tmp_path):
    """probe_weight only adds probe losses (update_state=False: writes within the probe, its final
    state discarded): the sequence losses are the same, the gradient is not."""
    rows = {}
    for w in (0.0, 0.5):
        b = block(probe_weight=w)
        stream = build_pretrain_stream(b)
        model = build_model_for(HOPE_IC, b, stream.vocab_size)
        opt = build_optimizer_for(b, model)
        rows[w] = train_step(model, opt, MetaSequences(stream, b), b, 0, torch.device("cpu")), _grads(model)
    (r0, g0), (r5, g5) = rows[0.0], rows[0.5]
    assert r0["loss"] == r5["loss"] and r0["later_segment_loss"] == r5["later_segment_loss"]
    assert r0["probe_loss"] != r0["probe_loss"] and r5["probe_loss"] > 0  # nan without probes
    assert any(not torch.equal(g0[n], g5[n]) for n in g0)


def test_truncated_backprop_window_decides_how_far_gradients_reach():
    """tbptt=1 equals summing per-sequence gradients with the incoming state detached; tbptt=2
    also differentiates sequence 2's loss through sequence 1's state writes."""
    from nlbench.models.base import detach_state
    from nlbench.protocol.evaluate import lm_loss

    b = block(tbptt=1, probe_weight=0.0, segments=2, grad_clip=None)
    stream = build_pretrain_stream(b)
    meta = MetaSequences(stream, b)
    results = {}
    for tb in (1, 2):
        model = build_model_for(HOPE_IC, {**b, "tbptt": tb}, stream.vocab_size)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a step that leaves the weights as they were
        train_step(model, opt, meta, {**b, "tbptt": tb}, 0, torch.device("cpu"))
        results[tb] = _grads(model)
    manual = build_model_for(HOPE_IC, b, stream.vocab_size)
    plan = meta.plan(0)
    state, total = None, 0.0
    for k in range(2):
        x, y = meta.draw(0, plan[:, k], ("seg", k, 0))
        out = manual(x, state=None if state is None else detach_state(state))
        total = total + lm_loss(out.logits, y) / 2
        state = out.state
    total.backward()
    ref = _grads(manual)
    assert all(torch.allclose(results[1][n], ref[n], atol=1e-6, rtol=1e-5) for n in ref)
    assert any(not torch.allclose(results[2][n], ref[n], atol=1e-6, rtol=1e-5) for n in ref)


# ----------------------------------------------------------------------------- the command


def test_pretrain_command_computes_then_reuses_and_rejects_a_config_without_a_block(tmp_path):
    import yaml
    from click.testing import CliRunner

    from nlbench.cli import main

    cfg = pretrain_config(seeds=(0,))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    first = CliRunner().invoke(main, ["pretrain", str(path), "--out", str(out), "--sequential"])
    assert first.exit_code == 0, first.output
    key = pretrain_key(expand_runs(validate_config(cfg))[0].config["model"], resolve_block(BLOCK, STREAM, 0))
    assert f"computed {key}" in first.output and "step 3/3" in first.output and "executions 1" in first.output
    again = CliRunner().invoke(main, ["pretrain", str(path), "--out", str(out), "--sequential"])
    assert again.exit_code == 0 and f"reused {key}" in again.output and executions(out / "pretrained", key) == 1
    del cfg["pretrain"]
    path.write_text(yaml.safe_dump(cfg))
    bare = CliRunner().invoke(main, ["pretrain", str(path), "--out", str(out), "--sequential"])
    assert bare.exit_code == 2 and "has no `pretrain:` block" in bare.output and "Traceback" not in bare.output
    helped = CliRunner().invoke(main, ["pretrain", "--help"])
    assert helped.exit_code == 0 and "probe_weight" in helped.output and "computed once" in helped.output


def test_pretrain_help_documents_every_key_at_its_default():
    import yaml
    from click.testing import CliRunner

    from nlbench.cli import main
    from nlbench.pretrain.config import PretrainConfig

    text = CliRunner().invoke(main, ["pretrain", "--help"], terminal_width=200).output
    block = {}
    for line in text.splitlines():  # the `key: value  # comment` lines of the example block
        key, sep, value = line.strip().partition(": ")
        if sep and key.isidentifier():
            block.setdefault(key, value.split("#")[0].strip())
    fields = PretrainConfig.model_fields
    assert set(fields) <= set(block), f"pretrain --help does not document {sorted(set(fields) - set(block))}"
    defaults = PretrainConfig().model_dump(mode="json")
    for key in set(fields) - {"stream", "optimizer"}:  # shown as examples, not defaults
        assert yaml.safe_load(block[key]) == defaults[key], f"--help shows {key}: {block[key]}, default {defaults[key]}"
    assert "nlbench run CONFIG --out OUT" in text and "nlbench report OUT" in text


def test_both_protocols_start_from_the_pretrained_weights(tmp_path):
    """The b row (after_task −1) of each protocol is the pretrained model's score, not the random
    initialisation's."""
    from nlbench.protocol.evaluate import evaluate, evaluate_with_state
    from nlbench.runner import build_run_stream

    specs = expand_runs(validate_config(pretrain_config(seeds=(0,), protocol=["in_context", "finetune"])))
    records = {s.protocol: execute_run(s, checkpoint_dir=tmp_path / "checkpoints") for s in specs}
    cfg = specs[0].config
    stream = build_run_stream(cfg)
    key = pretrain_key(cfg["model"], cfg["pretrain"])
    model = build_model(cfg["model"]["name"], vocab_size=stream.vocab_size).eval()
    load_pretrained(tmp_path / "pretrained" / key / "model.pt", key, model)
    dev = torch.device("cpu")
    for proto, rec in records.items():
        b0 = next(r["value"] for r in rec.matrix
                  if r["after_task"] == -1 and r["eval_task"] == 0 and r["metric"] == "loss")
        batch = stream.tasks[0].eval_set()
        if proto == "finetune":
            want = evaluate(model, batch, batch_size=4, max_sequences=4, device=dev)["loss"]
        else:
            want = evaluate_with_state(model, batch, None, streams=2, max_sequences=4, device=dev)["loss"]
        assert b0 == pytest.approx(want, rel=1e-6), proto
    fresh = build_model(cfg["model"]["name"], vocab_size=stream.vocab_size).eval()
    assert evaluate(fresh, stream.tasks[0].eval_set(), batch_size=4, max_sequences=4, device=dev)["loss"] != \
        pytest.approx(b0, rel=1e-3)


def test_a_diverged_pretraining_is_recorded_and_not_recomputed(tmp_path):
    b = {**block(), "optimizer": {"name": "adamw", "lr": 1e36}}  # one step sends the weights to ±1e37: overflow
    entry = dict(name="transformer", size="tiny", options={})
    with pytest.raises(PretrainError, match=r"diverged: non-finite .* at pretraining step 2"):
        ensure_pretrained(entry, b, tmp_path)
    key = pretrain_key(entry, b)
    with pytest.raises(PretrainError, match=r"diverged before .*delete .*failed.txt"):
        ensure_pretrained(entry, b, tmp_path)
    assert executions(tmp_path, key) == 1
