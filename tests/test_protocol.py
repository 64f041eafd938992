"""Protocols: finetune matrix (incl. the b row) and curves cadence, in_context frozen outer
parameters with a carried fast state, strategies, divergence, scoring."""

import math

import pytest
import torch

from nlbench.config import expand_runs, validate_config
from nlbench.models.base import ModelOutput
from nlbench.protocol import EWC, Replay, build_protocol, evaluate, evaluate_with_state
from nlbench.runner import build_run_model, build_run_stream, seed_everything

torch.set_num_threads(1)
DEV = torch.device("cpu")


def run_config(model="transformer", protocol="finetune", strategy="naive", num_tasks=2, seq_len=16,
               tokens_per_task=16 * 4 * 3, eval_every=None, **extra):
    raw = dict(
        models=[model] if isinstance(model, str) else [model],
        streams=[dict(name="markov-languages", num_tasks=num_tasks, seq_len=seq_len,
                      options=dict(vocab_size=16, order=1, branching=2, eval_size=8))],
        protocol=protocol, strategy=strategy,
        train=dict(tokens_per_task=tokens_per_task, batch_size=4, eval_every=eval_every,
                   optimizer=dict(name="adamw", lr=3e-3)),
        eval=dict(max_sequences=8, batch_size=4),
        **extra,
    )
    return expand_runs(validate_config(raw))[0].config


def make(config):
    seed_everything(config["seed"])
    stream = build_run_stream(config)
    model = build_run_model(config, stream.vocab_size)
    return build_protocol(config, model, stream, DEV), model, stream


def cells(rows, metric="accuracy"):
    return {(r["after_task"], r["eval_task"]): r["value"] for r in rows if r["metric"] == metric}


def test_finetune_full_matrix_with_b_row_and_token_budget():
    cfg = run_config(num_tasks=3, tokens_per_task=16 * 4 * 3 + 5)  # 3 steps per task (floor)
    proto, model, _ = make(cfg)
    res = proto.run()
    assert res.status == "completed" and res.tasks_done == 3
    for metric in ("accuracy", "loss"):
        c = cells(res.matrix, metric)
        assert set(c) == {(a, j) for a in (-1, 0, 1, 2) for j in (0, 1, 2)}
        assert all(math.isfinite(v) for v in c.values())
    assert proto.optimizer.step_count == 9
    assert res.tokens_seen == 9 * 4 * 16
    seen = {r["after_task"]: r["tokens_seen"] for r in res.matrix}
    assert seen == {-1: 0, 0: 192, 1: 384, 2: 576}
    assert res.train_s > 0 and res.eval_s > 0


def test_finetune_learns_and_changes_params():
    cfg = run_config(num_tasks=1, tokens_per_task=16 * 4 * 20)
    proto, model, stream = make(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    res = proto.run()
    loss, acc = cells(res.matrix, "loss"), cells(res.matrix)
    assert loss[(0, 0)] < loss[(-1, 0)] - 1.0  # the outer loop learned the task
    assert acc[(0, 0)] > stream.tasks[0].chance + 0.2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_curves_cadence_start_point_and_end_point():
    # 4 steps per task of 64 tokens, eval_every 128 -> points after steps 2 and 4 (the latter
    # from the end-of-task evaluation), plus the pre-task point Z_0
    cfg = run_config(num_tasks=2, tokens_per_task=4 * 64, eval_every=128)
    proto, _, _ = make(cfg)
    res = proto.run()
    acc = [r for r in res.curves if r["metric"] == "accuracy"]
    for k in (0, 1):
        own = sorted((r["tokens_seen"], r["value"]) for r in acc if r["train_task"] == k and r["eval_task"] == k)
        start = 256 * k
        assert [t for t, _ in own] == [start, start + 128, start + 256]
        m = cells(res.matrix)
        assert own[0][1] == m[(k - 1, k)]    # Z_0 = score before the task's first step
        assert own[-1][1] == m[(k, k)]       # last point = end-of-task evaluation
    # "all" curve tasks: every task is scored at every point
    assert len(acc) == 2 * 3 * 2


def test_in_context_freezes_outer_params_and_carries_state():
    cfg = run_config(model="titans-lmm", protocol="in_context", num_tasks=2, tokens_per_task=16 * 4 * 2)
    proto, model, stream = make(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = proto.run()
    assert res.status == "completed"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"outer parameter {k} changed"
    assert proto.state is not None
    flat = lambda s: torch.cat([t.reshape(-1) for t in _tensors(s)])  # noqa: E731
    fresh = flat(model.init_state(4))
    assert not torch.allclose(flat(proto.state), fresh), "carried state equals the fresh state"
    # carried, not reset per sequence: the final state is not what the last sequence alone writes
    it = stream.tasks[1].train_batches(4, seed=cfg["seed"])
    for _ in range(proto.steps_per_task):
        last = next(it)
    with torch.no_grad():
        alone = model(last.tokens, state=None).state
    assert not torch.allclose(flat(proto.state), flat(alone)), "state was reset between sequences"
    # probes read, never write: scoring twice gives the same result and leaves the state alone
    carried = flat(proto.state).clone()
    ev = stream.tasks[0].eval_set()
    a = evaluate_with_state(model, ev, proto.state, streams=4, max_sequences=6, device=DEV)
    b = evaluate_with_state(model, ev, proto.state, streams=4, max_sequences=6, device=DEV)
    assert a == b and torch.equal(flat(proto.state), carried)
    # the carried memory changes what the model predicts compared with the initial state
    fresh_scores = evaluate_with_state(model, ev, None, streams=4, max_sequences=6, device=DEV)
    assert fresh_scores["loss"] != a["loss"]
    assert set(cells(res.matrix)) == {(a_, j) for a_ in (-1, 0, 1) for j in (0, 1)}


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


class FixedPredictor(torch.nn.Module):
    """Predicts token (t mod V) at position t: accuracy is countable by hand."""

    def __init__(self, V):
        super().__init__()
        self.V, self.w = V, torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens, state=None, update_state=True):
        B, T = tokens.shape
        pred = torch.arange(T) % self.V
        return ModelOutput(torch.nn.functional.one_hot(pred, self.V).float().expand(B, T, self.V) * 5 + self.w, state)


def test_evaluate_hand_computed_and_batch_size_invariant():
    V = 4
    tokens = torch.zeros(3, 4, dtype=torch.long)
    targets = torch.tensor([[0, 1, -100, 0], [0, 0, 0, 0], [-100, -100, 2, 3]])
    # predictions 0 1 2 3 per row: hits (0,0),(0,1),(1,0),(2,2),(2,3) of 9 scored
    model = FixedPredictor(V)
    for bs in (1, 2, 3):
        out = evaluate(model, (tokens, targets), batch_size=bs, max_sequences=None, device=DEV)
        assert out["accuracy"] == pytest.approx(5 / 9)
    p_hit = math.exp(5) / (math.exp(5) + 3)
    p_miss = 1 / (math.exp(5) + 3)
    expected = -(5 * math.log(p_hit) + 4 * math.log(p_miss)) / 9
    assert out["loss"] == pytest.approx(expected, rel=1e-5)
    assert evaluate(model, (tokens, targets), batch_size=2, max_sequences=1, device=DEV)["accuracy"] == pytest.approx(2 / 3)
    padded = evaluate_with_state(model, (tokens, targets), None, streams=2, max_sequences=None, device=DEV)
    assert padded["accuracy"] == pytest.approx(5 / 9)  # padding rows are not scored


def test_replay_reservoir_buffer_and_mixing():
    cfg = run_config(strategy="replay", replay=dict(buffer_size=5, ratio=0.5))
    r = Replay(cfg, model=None, device=DEV)
    x0 = torch.zeros(4, 3, dtype=torch.long)
    assert r.mix(x0, x0)[0].shape[0] == 4  # empty buffer: nothing to replay
    for i in range(10):
        r.observe(torch.full((4, 3), i), torch.full((4, 3), i))
    assert r.n_seen == 40 and r.n_stored == 5
    assert torch.equal(r.tokens, r.targets)   # pairs stay together
    x, y = r.mix(torch.full((4, 3), -1), torch.full((4, 3), -1))
    assert x.shape == (6, 3) and torch.equal(x[4:], y[4:]) and (x[4:] >= 0).all()
    # reservoir keeps every sequence with probability size/n: late batches are not favoured
    counts = torch.zeros(10)
    for trial in range(200):
        r = Replay({**cfg, "seed": trial}, model=None, device=DEV)
        for i in range(10):
            r.observe(torch.full((4, 3), i), torch.full((4, 3), i))
        counts += torch.bincount(r.tokens[:, 0], minlength=10)
    expected = 200 * 5 / 10
    assert (counts - expected).abs().max() < 0.45 * expected
    assert counts[:5].sum() > 0.35 * counts.sum()


def test_ewc_penalty_hand_computed():
    cfg = run_config(strategy="ewc", ewc=dict(lam=4.0, fisher_samples=2))
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 3.0]]))
    e = EWC(cfg, lin, DEV)
    assert e.penalty() is None
    e.tasks = [({"weight": torch.tensor([[2.0, 0.5]])}, {"weight": torch.tensor([[0.0, 1.0]])}),
               ({"weight": torch.tensor([[1.0, 1.0]])}, {"weight": torch.tensor([[1.0, 2.0]])})]
    # λ/2 Σ_k Σ F (θ−θ*)² = 2 · [(2·1 + 0.5·4) + (0 + 1)] = 10
    assert e.penalty().item() == pytest.approx(10.0)


def test_ewc_fisher_is_mean_squared_per_sequence_gradient():
    cfg = run_config(strategy="ewc", ewc=dict(lam=1.0, fisher_samples=3))
    _, model, stream = make(cfg)
    e = EWC(cfg, model, DEV)
    F = e.fisher(stream.tasks[0])
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    # reference: three explicit backward passes on the same sequences
    from nlbench.protocol.strategies import derive_seed
    from nlbench.protocol.evaluate import lm_loss
    it = stream.tasks[0].train_batches(1, seed=derive_seed(cfg["seed"], "ewc-fisher", 0))
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(3):
        x, y = next(it)
        model.zero_grad()
        lm_loss(model(x).logits, y).backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad ** 2 / 3
    for n in ref:
        torch.testing.assert_close(F[n], ref[n])


def test_strategies_run_and_change_training_vs_naive():
    results = {}
    for strategy in ("naive", "replay", "ewc"):
        cfg = run_config(strategy=strategy, num_tasks=2, tokens_per_task=16 * 4 * 3,
                         replay=dict(buffer_size=8, ratio=1.0), ewc=dict(lam=1e4, fisher_samples=4))
        proto, _, _ = make(cfg)
        res = proto.run()
        assert res.status == "completed"
        results[strategy] = cells(res.matrix, "loss")
    naive, replay, ewc = results["naive"], results["replay"], results["ewc"]
    assert replay[(-1, 0)] == naive[(-1, 0)]
    assert replay[(1, 0)] != naive[(1, 0)]
    # EWC acts only from the second task on; its Fisher pass must not perturb task 0
    assert ewc[(0, 0)] == naive[(0, 0)] and ewc[(0, 1)] == naive[(0, 1)]
    assert ewc[(1, 0)] != naive[(1, 0)]


def _poison_after(model, calls):
    """Make the LM head emit inf from its `calls`-th training forward on."""
    count = {"n": 0}

    def hook(module, inp, out):
        if torch.is_grad_enabled():
            count["n"] += 1
            if count["n"] >= calls:
                return out * float("inf")
        return out
    return model.lm_head.register_forward_hook(hook)


def test_divergence_ends_run_with_step_and_reason():
    cfg = run_config(num_tasks=2, tokens_per_task=16 * 4 * 3)
    proto, model, _ = make(cfg)
    _poison_after(model, 5)   # task 1, its 2nd step
    res = proto.run()
    assert res.status == "diverged" and res.diverged_step == 5
    assert "non-finite" in res.error and "task 1" in res.error
    assert {r["after_task"] for r in res.matrix} == {-1, 0}   # rows up to the last finished task


def test_divergence_from_huge_lr():
    raw = dict(models=["transformer"], streams=[dict(name="markov-languages", num_tasks=2, seq_len=16,
                                                     options=dict(vocab_size=16, order=1, branching=2, eval_size=8))],
               train=dict(tokens_per_task=16 * 4 * 6, batch_size=4, grad_clip=None,
                          optimizer=dict(name="muon", lr=1e6, adamw_lr=1e6)),
               eval=dict(max_sequences=8, batch_size=4))
    cfg = expand_runs(validate_config(raw))[0].config
    proto, _, _ = make(cfg)
    res = proto.run()
    assert res.status == "diverged" and res.diverged_step >= 1 and "non-finite" in res.error


def test_joint_interleaves_every_task_with_the_same_steps():
    from nlbench.protocol.strategies import Joint, derive_seed

    cfg = run_config(strategy="joint", num_tasks=3)
    proto, model, stream = make(cfg)
    assert isinstance(proto.strategy, Joint)
    # phase 1 starting at run step 4: steps 4, 5, 6, … take tasks 1, 2, 0, …, each batch from that
    # task's own stream for this phase (the rotation continues across phases)
    got = proto.strategy.train_batches(stream, 1, 4, first_step=4)
    own = [t.train_batches(4, seed=derive_seed(cfg["seed"], "joint", 1, t.index)) for t in stream.tasks]
    for k in range(4, 10):
        x, y = next(got)
        rx, ry = next(own[k % 3])
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # the protocol passes the run's step count: spy on what phase i asks for
    asked = []
    inner = proto.strategy.train_batches
    proto.strategy.train_batches = lambda s, i, b, first_step=0: (asked.append((i, first_step)), inner(s, i, b, first_step))[1]
    res = proto.run()
    assert asked == [(0, 0), (1, 3), (2, 6)]
    assert res.status == "completed" and proto.optimizer.step_count == 3 * proto.steps_per_task
    naive = make(run_config(num_tasks=3))[0].run()
    assert res.tokens_seen == naive.tokens_seen  # same total tokens as sequential training
    # after phase 0 the joint model has trained on task 2's data, the sequential one has not
    assert cells(res.matrix, "loss")[(0, 2)] < cells(naive.matrix, "loss")[(0, 2)]


def test_fresh_starts_every_task_from_the_initial_weights_with_a_new_optimizer():
    cfg = run_config(strategy="fresh", num_tasks=2)
    proto, model, stream = make(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    proto.train_task(0)
    assert any(not torch.equal(init[k], v) for k, v in model.state_dict().items())
    first_opt = proto.optimizer
    proto.start_task(1)
    assert all(torch.equal(init[k], v) for k, v in model.state_dict().items())
    assert proto.optimizer is not first_opt and proto.optimizer.step_count == 0
    # a fresh run's task-1 row equals a naive run trained on task 1 alone from the same init
    fresh = make(cfg)[0].run()
    alone_cfg = run_config(num_tasks=2)
    alone, _, _ = make(alone_cfg)
    alone.train_task(1)
    scores = alone.evaluate_tasks(alone.stream.tasks)
    assert cells(fresh.matrix, "loss")[(1, 1)] == pytest.approx(scores[1]["loss"], rel=1e-5)
    assert cells(fresh.matrix, "loss")[(1, 0)] == pytest.approx(scores[0]["loss"], rel=1e-5)


def stream_config(stream: dict, num_steps=2, eval_every=None, model="transformer", **extra):
    raw = dict(models=[model], streams=[stream], protocol="finetune", strategy="naive",
               train=dict(tokens_per_task=4 * 65 * num_steps, batch_size=4, eval_every=eval_every,
                          optimizer=dict(name="adamw", lr=3e-3)),
               eval=dict(max_sequences=16, batch_size=8), **extra)
    return expand_runs(validate_config(raw))[0].config


def test_task_incremental_mask_in_training_gradients_and_in_scoring():
    cfg = stream_config(dict(name="split-digits-task", num_tasks=2, options=dict(eval_size=16)), num_steps=1)
    proto, model, stream = make(cfg)
    label0 = stream.tasks[0].info["label_token_offset"]
    grads = []

    def keep_logit_grads(module, inputs, out):
        if out.logits.requires_grad:
            out.logits.register_hook(grads.append)

    model.register_forward_hook(keep_logit_grads)
    proto.train_task(0)
    g = grads[0]
    scored = g.abs().sum(-1) > 0
    assert scored.any()
    # training: only task 0's labels (digits 0, 1) get a gradient at the scored positions
    assert g[scored][:, label0:label0 + 2].abs().sum() > 0
    assert g[scored][:, label0 + 2:label0 + 10].abs().sum() == 0 and g[scored][:, :label0].abs().sum() == 0
    # scoring: argmax over the task's own two labels
    model.eval()
    for task in stream.tasks:
        ev = task.eval_set()
        x, y = ev.tokens[:16], ev.targets[:16]
        with torch.no_grad():
            logits = model(x, state=None).logits
        m = y != -100
        pair = logits[m][:, label0 + 2 * task.index:label0 + 2 * task.index + 2]
        want = float((pair.argmax(-1) + label0 + 2 * task.index == y[m]).float().mean())
        assert proto.score(task)["accuracy"] == pytest.approx(want)


def test_recurring_stream_run_gives_relearn_savings_from_its_curves():
    import pandas as pd

    from nlbench import metrics as M

    cfg = stream_config(dict(name="recurring", num_tasks=3, options=dict(eval_size=16)), num_steps=2, eval_every=4 * 65)
    proto, _, stream = make(cfg)
    res = proto.run()
    assert [t.info["source"] for t in stream.tasks] == [0, 1, 0]
    acc = cells(res.matrix)
    assert acc[(-1, 0)] == acc[(-1, 2)] and acc[(1, 0)] == acc[(1, 2)]      # one task, one held-out set
    curves = pd.DataFrame(res.curves).assign(run_id="r")
    matrix = pd.DataFrame(res.matrix).assign(run_id="r", model="transformer", stream="recurring", seed=0)
    out = M.per_run_metrics(matrix, None, curves).set_index("score")
    Z = M.curve_matrix(curves[curves["metric"] == "accuracy"])
    assert Z.shape == (3, 3) and Z[2, 0] == acc[(1, 2)]                    # A comes back at what B left of it
    assert out.loc["accuracy", "relearn_savings"] == pytest.approx(Z[2].mean() - Z[0].mean())
