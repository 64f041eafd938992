"""`python -m nlbench.bench.steps`: models' train steps alternate in one process (the order
reverses every other round), a step trains (parameters move), and the printout has one line per
model with its tokens/s over the last model's. Timings themselves are never asserted."""

import torch

from nlbench.bench import steps as bench_steps


def test_alternate_reverses_the_order_every_other_round():
    calls = []
    fs = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = bench_steps.alternate(fs, n=2, warmup=0)
    assert calls == ["a", "b", "c", "c", "b", "a"]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2, "c": 2}


def test_train_step_updates_the_model(monkeypatch):
    built = {}
    from nlbench import models

    real = models.build_model

    def spy(*a, **k):
        built["model"] = real(*a, **k)
        return built["model"]

    monkeypatch.setattr(models, "build_model", spy)
    step = bench_steps.train_step("hope", "tiny", seq_len=16, batch=2, vocab=32, optimizer="muon", lr=0.02)
    before = {n: p.detach().clone() for n, p in built["model"].named_parameters()}
    step()
    moved = [n for n, p in built["model"].named_parameters() if not torch.equal(before[n], p)]
    assert "blocks.0.mixer.mem0.k_w2" in moved and "tok_emb.weight" in moved


def test_main_prints_each_model_against_the_last(capsys):
    bench_steps.main(["--models", "hope,transformer", "--size", "tiny", "--seq-len", "16", "--batch", "2",
                      "--vocab", "32", "--steps", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tiny, T=16, batch 2, adamw")
    assert out[1].startswith("hope ") and "of transformer's tokens/s" in out[1]
    assert out[2].startswith("transformer ") and "×1.000 of transformer's" in out[2]
