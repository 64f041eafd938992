"""Experiment config: validation errors name the field and the allowed values; expansion
count and stable, content-addressed run ids; dotted overrides."""

import copy

import pytest
import torch
import yaml

from nlbench.config import (ConfigError, apply_override, expand_runs, load_config, spec_from_config,
                            validate_config, validate_run_config)
from nlbench.models import MODELS

BASE = dict(
    name="t",
    models=["transformer"],
    streams=[dict(name="markov-languages", num_tasks=2, seq_len=16)],
    train=dict(tokens_per_task=256, batch_size=4),
)


def cfg_with(**changes):
    d = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return d


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    return str(e.value)


@pytest.mark.parametrize("raw, field, allowed", [
    (cfg_with(models=["gpt2"]), "models.0.name", ["'hope'", "'transformer'", "'titans-mac'"]),
    (cfg_with(models=[dict(name="hope", size="huge")]), "models.0.size", ["'tiny'", "'large'"]),
    (cfg_with(streams=["wikitext"]), "streams.0.name", ["'markov-languages'", "'split-digits'"]),
    (cfg_with(protocol="online"), "protocol.0", ["'finetune'", "'in_context'"]),
    (cfg_with(strategy=["naive", "gem"]), "strategy.1", ["'naive'", "'replay'", "'ewc'"]),
    (cfg_with(train__optimizer=dict(name="sgd")), "train.optimizer.name", ["'adamw'", "'muon'", "'m3'", "'dgd'"]),
    (cfg_with(train__device="tpu"), "train.device", ["'auto'", "'cpu'", "'cuda'"]),
])
def test_bad_choice_names_field_and_allowed_values(raw, field, allowed):
    msg = error_of(raw)
    assert f"'{field}'" in msg
    for a in allowed:
        assert a in msg, (a, msg)
    assert "\n" not in msg  # one paragraph


@pytest.mark.parametrize("raw, field, bound", [
    (cfg_with(train__tokens_per_task=-5), "train.tokens_per_task", "-5"),
    (cfg_with(train__batch_size=0), "train.batch_size", "0"),
    (cfg_with(train__optimizer=dict(name="adamw", lr=-1e-3)), "train.optimizer.lr", "-0.001"),
    (cfg_with(eval=dict(max_sequences=-1)), "eval.max_sequences", "-1"),
    (cfg_with(replay=dict(buffer_size=-3)), "replay.buffer_size", "-3"),
    (cfg_with(ewc=dict(lam=-1.0)), "ewc.lam", "-1.0"),
    (cfg_with(seeds=[-1]), "seeds", "-1"),
])
def test_negative_numbers_are_rejected_with_field(raw, field, bound):
    msg = error_of(raw)
    assert f"'{field}'" in msg and bound in msg


def test_unknown_keys_name_the_key_and_list_allowed_keys():
    msg = error_of(cfg_with(epochs=3))
    assert "'epochs'" in msg and "'train'" in msg and "'models'" in msg
    msg = error_of(cfg_with(train__lr=0.1))
    assert "'train.lr'" in msg and "'tokens_per_task'" in msg and "'optimizer'" in msg
    msg = error_of(cfg_with(train__optimizer=dict(name="adamw", alpha=1.0)))
    assert "'train.optimizer'" in msg and "'alpha'" in msg and "'weight_decay'" in msg


def test_model_and_stream_options_are_checked_by_their_factories():
    msg = error_of(cfg_with(models=[dict(name="transformer", options=dict(n_memories=4))]))
    assert "'models.0.options'" in msg and "n_memories" in msg and "mlp_hidden" in msg
    msg = error_of(cfg_with(streams=[dict(name="markov-languages", options=dict(colour=1))]))
    assert "'streams.0.options'" in msg and "colour" in msg and "'order'" in msg
    msg = error_of(cfg_with(streams=[dict(name="split-digits", num_tasks=9)]))
    assert "'streams.0.num_tasks'" in msg and "[1, 5]" in msg


def test_missing_required_section():
    d = copy.deepcopy(BASE)
    del d["train"]
    assert "'train'" in error_of(d) and "missing" in error_of(d)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [transformer\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg_with(models=["nope"])))
    with pytest.raises(ConfigError, match=str(p).replace(".", r"\.")):
        load_config(p)


def test_expansion_count_and_stable_ids():
    raw = cfg_with(
        models=["transformer", dict(name="transformer", label="tf-wide", options=dict(mlp_hidden=96))],
        streams=[dict(name="markov-languages", num_tasks=2, seq_len=16), dict(name="split-digits", num_tasks=2)],
        seeds=[0, 1, 2],
        protocol=["finetune", "in_context"],
        strategy=["naive", "replay", "ewc"],
        variants=[dict(label="lo"), dict(label="hi", overrides={"train.optimizer.lr": 1e-2})],
    )
    specs = expand_runs(validate_config(raw))
    # finetune × 3 strategies + in_context × naive only = 4 combos
    assert len(specs) == 2 * 2 * 3 * 4 * 2
    ids = [s.run_id for s in specs]
    assert len(set(ids)) == len(ids)
    assert ids == [s.run_id for s in expand_runs(validate_config(copy.deepcopy(raw)))]
    hi = [s for s in specs if s.config["variant"] == "hi"]
    assert all(s.config["train"]["optimizer"]["lr"] == 1e-2 for s in hi)
    assert {s.model for s in specs} == {"transformer@lo", "transformer@hi", "tf-wide@lo", "tf-wide@hi"}
    assert all(s.strategy == "naive" for s in specs if s.protocol == "in_context")


def test_run_id_covers_results_not_resources():
    a = expand_runs(validate_config(cfg_with()))[0]
    same = expand_runs(validate_config(cfg_with(resources=dict(cpus_per_run=4), name="other", train__device="cpu")))[0]
    assert a.run_id == same.run_id
    for changed in (cfg_with(seeds=[1]), cfg_with(train__tokens_per_task=512),
                    cfg_with(train__optimizer=dict(name="adamw", lr=1e-2)),
                    cfg_with(models=[dict(name="transformer", size="small")])):
        assert expand_runs(validate_config(changed))[0].run_id != a.run_id


def test_apply_override_paths():
    run = expand_runs(validate_config(cfg_with()))[0].config
    run = apply_override(run, "model.options.mlp_hidden", 96)       # new key in an open mapping
    run = apply_override(run, "train.optimizer.weight_decay", 0.1)   # optimizer hyper-parameter
    run = apply_override(run, "train.optimizer.lr", 1e-2)
    assert run["model"]["options"] == {"mlp_hidden": 96}
    assert run["train"]["optimizer"] == {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1}
    listy = apply_override(apply_override(run, "model.options.periods", [1, 4, 16]), "model.options.periods.1", 8)
    assert listy["model"]["options"]["periods"] == [1, 8, 16]
    assert "periods" not in run["model"]["options"]  # no mutation of the input
    with pytest.raises(ConfigError, match=r"'train' has no key 'optimiser'.*'optimizer'"):
        apply_override(run, "train.optimiser.lr", 1.0)
    with pytest.raises(ConfigError, match="'train' has no key 'learning_rate'"):
        apply_override(run, "train.learning_rate", 1.0)
    with pytest.raises(ConfigError, match="index 5 out of range"):
        apply_override(listy, "model.options.periods.5", 1)
    with pytest.raises(ConfigError, match="is a value"):
        apply_override(run, "seed.x", 1)
    with pytest.raises(ConfigError, match="dotted keys"):
        apply_override(run, "train..lr", 1)
    with pytest.raises(ConfigError, match="'train.optimizer.lr'"):
        validate_run_config(apply_override(run, "train.optimizer.lr", -1.0))
    spec = spec_from_config(run)
    assert spec.run_id != expand_runs(validate_config(cfg_with()))[0].run_id


def test_bad_variant_override_is_a_config_error():
    msg = error_of(cfg_with(variants=[dict(overrides={"train.optimiser.lr": 1.0})]))
    assert "'variants.0.overrides'" in msg and "optimiser" in msg
    msg = error_of(cfg_with(variants=[dict(overrides={"model.name": "gpt"})]))
    assert "'variants.0.overrides'" in msg and "'model.name'" in msg and "'hope'" in msg


def test_in_context_run_rejects_training_strategies():
    run = expand_runs(validate_config(cfg_with()))[0].config
    run = apply_override(apply_override(run, "protocol", "in_context"), "strategy", "ewc")
    with pytest.raises(ConfigError, match="in_context.*naive"):
        validate_run_config(run)


def test_every_registered_model_name_is_accepted():
    raw = cfg_with(models=sorted(MODELS))
    assert len(expand_runs(validate_config(raw))) == len(MODELS)


def test_yaml_scientific_notation_reads_as_float(tmp_path):
    # PyYAML reads 1e-3 (no dot) as the string '1e-3'
    p = tmp_path / "c.yaml"
    p.write_text("models: [{name: titans-lmm, options: {max_lr: 5e-2}}]\nstreams: [markov-languages]\n"
                 "train: {tokens_per_task: 100, optimizer: {name: m3, lr: 1e-3, eps: 1e-8, variant: paper}}\n")
    run = expand_runs(load_config(p))[0].config
    assert run["model"]["options"]["max_lr"] == 0.05
    assert run["train"]["optimizer"] == {"name": "m3", "lr": 1e-3, "eps": 1e-8, "variant": "paper"}


def test_every_shipped_config_loads_and_expands():
    """configs/*.yaml: experiment configs expand to runs, bench and tune configs validate — a
    config edited by hand (or a renamed option) fails here, not in a user's hour-long run."""
    from pathlib import Path

    import yaml

    from nlbench.bench.bench_config import load_bench_config
    from nlbench.config import expand_runs, load_config
    from nlbench.selection.config import load_leaderboard_config
    from nlbench.tune import load_tune_config

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(paths) >= 7
    for p in paths:
        raw = yaml.safe_load(p.read_text())
        if "tuning_seeds" in raw:  # a leaderboard config: selection studies, then reporting runs
            lc, plans = load_leaderboard_config(p)
            assert plans and not set(lc.tuning_seeds) & set(lc.seeds or []), p.name
        elif "space" in raw:
            tc, experiment = load_tune_config(p)
            assert tc.trials >= 1 and experiment["models"], p.name
        elif "seq_lens" in raw:
            assert load_bench_config(p).models, p.name
        else:
            assert expand_runs(load_config(p)), p.name


def test_model_optimizer_gives_one_entry_its_own_optimizer_and_leaves_the_others_alone():
    from nlbench.optim import M3, Muon
    from nlbench.protocol import build_protocol
    from nlbench.runner import build_run_model, build_run_stream

    plain = cfg_with(models=["transformer", "hope"], train__optimizer=dict(name="muon", lr=0.02))
    with_m3 = cfg_with(models=["transformer", "hope", dict(name="hope", label="hope-m3")],
                       train__optimizer=dict(name="muon", lr=0.02),
                       model_optimizer={"hope-m3": dict(name="m3", lr=0.01)})
    before = {s.config["model"]["label"]: s for s in expand_runs(validate_config(plain))}
    after = {s.config["model"]["label"]: s for s in expand_runs(validate_config(with_m3))}
    assert after["hope-m3"].config["train"]["optimizer"] == {"name": "m3", "lr": 0.01}
    for label in ("transformer", "hope"):  # the other entries: same runs, same ids
        assert after[label].run_id == before[label].run_id
        assert after[label].config["train"]["optimizer"] == {"name": "muon", "lr": 0.02}
    # the run builds M3 for the Hope-M3 entry and Muon for Hope
    for label, kind in (("hope-m3", M3), ("hope", Muon)):
        # (M3 is not a Muon subclass, so the check tells them apart)
        config = after[label].config
        stream = build_run_stream(config)
        proto = build_protocol(config, build_run_model(config, stream.vocab_size), stream, torch.device("cpu"))
        inner = [opt for _, opt in proto.optimizer.optimizers.values()]
        assert any(isinstance(opt, kind) for opt in inner), (label, inner)
        assert not (label == "hope" and any(isinstance(opt, M3) for opt in inner))
    msg = error_of(cfg_with(model_optimizer={"hope-m3": dict(name="m3")}))
    assert "model_optimizer" in msg and "'hope-m3'" in msg and "'transformer'" in msg
    msg = error_of(cfg_with(model_optimizer={"transformer": dict(name="sgd")}))
    assert "model_optimizer" in msg and "'m3'" in msg
