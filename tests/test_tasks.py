"""Tests of nlbench.tasks: determinism, layout, exact chance/ceiling, learnability, errors."""
import math

import numpy as np
import pytest
import torch

from nlbench.tasks import IGNORE_INDEX, STREAMS, Batch, build_stream, describe_streams, shift_targets
from nlbench.tasks.markov import MarkovLanguage

torch.set_num_threads(1)

NAMES = ["markov-languages", "associative-recall", "modular-arithmetic", "permuted-tokens",
         "split-digits", "permuted-digits", "text-domains", "passkey", "mqar", "split-digits-task",
         "recurring"]

# small but non-trivial sizes per stream, to stay fast on 2 cores
SMALL = {
    "markov-languages": dict(num_tasks=3, seq_len=32, vocab_size=16, order=2),
    "associative-recall": dict(num_tasks=3, seq_len=40, n_keys=16, n_values=16, n_pairs=8),
    "modular-arithmetic": dict(num_tasks=3, seq_len=30, modulus=13),
    "permuted-tokens": dict(num_tasks=3, seq_len=32, vocab_size=16, order=1),
    "split-digits": dict(num_tasks=5),
    "permuted-digits": dict(num_tasks=3),
    "text-domains": dict(num_tasks=2, seq_len=48, max_chars=200_000, block=4096),
    "passkey": dict(num_tasks=3, seq_len=48, key_digits=4, min_len=20),
    "mqar": dict(num_tasks=3, seq_len=40, n_keys=8, n_values=8, n_pairs=6),
    "split-digits-task": dict(num_tasks=5),
    "recurring": dict(num_tasks=5),
}

_cache = {}


def small(name, seed=0, **extra):
    key = (name, seed, tuple(sorted(extra.items())))
    if key not in _cache:
        _cache[key] = build_stream(name, seed=seed, eval_size=128, **{**SMALL[name], **extra})
    return _cache[key]


def same(a: Batch, b: Batch) -> bool:
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)


def scored_acc(pred, targets) -> float:
    m = targets != IGNORE_INDEX
    return float((pred[m] == targets[m]).float().mean())


# ---- contract, every stream -------------------------------------------------------------------

def test_registry_lists_every_stream_with_a_description():
    assert list(STREAMS) == NAMES
    desc = describe_streams()
    assert set(desc) == set(NAMES) and all(len(d) > 20 for d in desc.values())


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_data_other_seed_other_data(name):
    a, b, c = small(name, seed=0), build_stream(name, seed=0, eval_size=128, **SMALL[name]), \
        small(name, seed=1)
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        it_a, it_b = ta.train_batches(4, seed=7), tb.train_batches(4, seed=7)
        first = [next(it_a) for _ in range(2)]
        assert all(same(x, next(it_b)) for x in first)
        assert same(first[0], next(ta.train_batches(4, seed=7)))     # a fresh iterator restarts
        assert not same(first[0], first[1])                           # and it does not repeat
        assert not same(first[0], next(ta.train_batches(4, seed=8)))
        assert same(ta.eval_set(), tb.eval_set())
        assert not same(ta.eval_set(), tc.eval_set()), f"{name}: seed does not change eval"


@pytest.mark.parametrize("name", NAMES)
def test_shapes_vocab_and_scored_positions(name):
    s = small(name)
    assert s.kind == ("lm" if name == "text-domains" else "accuracy")
    assert len(s.tasks) == SMALL[name].get("num_tasks")
    for i, task in enumerate(s.tasks):
        assert task.index == i and isinstance(task.name, str)
        assert 0 < task.chance < 1
        assert task.ceiling is None or task.chance < task.ceiling <= 1
        for batch in (next(task.train_batches(5, seed=0)), task.eval_set()):
            assert batch.tokens.dtype == torch.long and batch.targets.dtype == torch.long
            assert batch.tokens.shape == batch.targets.shape
            assert batch.tokens.shape[1] == s.seq_len
            assert 0 <= batch.tokens.min() and batch.tokens.max() < s.vocab_size
            t = batch.targets
            assert ((t == IGNORE_INDEX) | ((t >= 0) & (t < s.vocab_size))).all()
            assert ((t != IGNORE_INDEX).sum(1) >= 1).all(), "a row without a scored position"
        assert next(task.train_batches(5, seed=0)).tokens.shape[0] == 5


@pytest.mark.parametrize("name", NAMES)
def test_eval_set_fixed_across_calls_and_safe_to_mutate(name):
    task = small(name).tasks[-1]
    e1 = task.eval_set()
    e1.tokens.zero_()
    e2, e3 = task.eval_set(), task.eval_set()
    assert same(e2, e3) and not torch.equal(e2.tokens, e1.tokens)
    assert e2.tokens.shape[0] <= 128                     # eval_size caps the eval set


@pytest.mark.parametrize("name", NAMES)
def test_chance_is_the_majority_baseline_on_the_eval_set(name):
    s = small(name)
    for task in s.tasks:
        t = task.eval_set().targets
        t = t[t != IGNORE_INDEX]
        majority = float(torch.bincount(t).max()) / t.numel()
        tol = 4 * math.sqrt(task.chance * (1 - task.chance) / t.numel()) + 0.005
        assert abs(majority - task.chance) <= tol, (task.name, majority, task.chance)
        assert task.chance >= 1 / s.vocab_size - 1e-9     # never below a uniform guess


@pytest.mark.parametrize("name", ["passkey", "text-domains"])
def test_streams_and_tasks_pickle_as_their_recipe(name):
    import pickle
    s = small(name)
    s2 = pickle.loads(pickle.dumps(s))
    t2 = pickle.loads(pickle.dumps(s.tasks[1]))
    assert s2.recipe == s.recipe and s2.vocab_size == s.vocab_size and t2.name == s.tasks[1].name
    assert same(s2.tasks[1].eval_set(), s.tasks[1].eval_set())
    assert same(next(t2.train_batches(3, 5)), next(s.tasks[1].train_batches(3, 5)))


# ---- the single shift ---------------------------------------------------------------------------

def test_shift_targets_shifts_exactly_once():
    seq = np.array([[5, 6, 7, 8]])
    b = shift_targets(seq, np.array([[False, True, False, True]]))
    assert b.tokens.tolist() == [[5, 6, 7]]
    assert b.targets.tolist() == [[6, IGNORE_INDEX, 8]]


@pytest.mark.parametrize("name", ["markov-languages", "permuted-tokens", "text-domains"])
def test_lm_targets_are_the_next_input_token(name):
    b = small(name).tasks[1].eval_set()
    m = b.targets[:, :-1] != IGNORE_INDEX
    assert m.float().mean() > 0.9
    assert torch.equal(b.targets[:, :-1][m], b.tokens[:, 1:][m])


# ---- markov-languages / permuted-tokens --------------------------------------------------------

def test_markov_exact_chance_and_ceiling_hand_computed():
    # P(.|0) = (0.8, 0.2), P(.|1) = (0.4, 0.6), first token uniform.
    # label 1: state (.5,.5): Bayes .5*.8+.5*.6 = .70, P(0) = .5*.8+.5*.4 = .60
    # label 2: state (.6,.4): Bayes .6*.8+.4*.6 = .72, P(0) = .6*.8+.4*.4 = .64
    lang = MarkovLanguage.from_table(2, 1, [[0, 1], [0, 1]], [[0.8, 0.2], [0.4, 0.6]])
    assert np.allclose(lang.exact_chance_and_ceiling(2), (0.60, 0.70))
    assert np.allclose(lang.exact_chance_and_ceiling(3), (0.62, 0.71))


def test_markov_ceiling_equals_bayes_predictor_accuracy_on_eval():
    s = build_stream("markov-languages", num_tasks=2, seq_len=64, seed=3, eval_size=512,
                     vocab_size=16, order=2, branching=3)
    for task in s.tasks:
        ev, lang = task.eval_set(), task.info["language"]
        acc = scored_acc(lang.bayes_predict(ev.tokens), ev.targets)
        n = int((ev.targets != IGNORE_INDEX).sum())
        assert abs(acc - task.ceiling) < 4 * math.sqrt(0.25 / n) + 0.003, (acc, task.ceiling)
        assert task.ceiling > 3 * task.chance                  # learnable, far above chance
    t0, t1 = s.tasks
    assert not np.array_equal(t0.info["language"].next_tokens, t1.info["language"].next_tokens)
    # a task's Bayes predictor is worse on another task: the languages really differ
    ev1 = t1.eval_set()
    assert scored_acc(t0.info["language"].bayes_predict(ev1.tokens), ev1.targets) < t1.ceiling - 0.2


def test_markov_labels_follow_the_table():
    task = small("markov-languages").tasks[0]
    lang, b = task.info["language"], next(task.train_batches(16, seed=0))
    ctx = np.lib.stride_tricks.sliding_window_view(b.tokens.numpy(), 2, axis=1)   # [B, T-1, 2]
    states = lang.state_of(ctx)
    labels = b.targets[:, 1:].numpy()
    allowed = (lang.next_tokens[states] == labels[..., None]).any(-1)
    assert allowed.all() and (b.targets[:, 0] == IGNORE_INDEX).all()   # first label has no context


def test_permuted_tokens_task0_identity_and_others_permutations():
    s = small("permuted-tokens")
    perms = [t.info["permutation"] for t in s.tasks]
    V = s.vocab_size
    assert torch.equal(perms[0], torch.arange(V))
    for p in perms[1:]:
        assert torch.equal(p.sort().values, torch.arange(V)) and not torch.equal(p, perms[0])
    assert not torch.equal(perms[1], perms[2])
    e0 = s.tasks[0].eval_set()
    for task, p in zip(s.tasks, perms):
        e = task.eval_set()
        assert torch.equal(e.tokens, p[e0.tokens])
        m = e0.targets != IGNORE_INDEX
        assert torch.equal(e.targets[m], p[e0.targets[m]]) and torch.equal(e.targets != -100, m)
        assert task.chance == s.tasks[0].chance and task.ceiling == s.tasks[0].ceiling


# ---- associative-recall -------------------------------------------------------------------------

def test_associative_recall_layout_and_in_context_lookup_solves_it():
    s = small("associative-recall")
    K, n_pairs = 16, 8
    for task in s.tasks:
        ev = task.eval_set()
        toks, tg = ev.tokens.numpy(), ev.targets.numpy()
        value_of = task.info["value_of"]
        keys, vals = toks[:, 0:2 * n_pairs:2], toks[:, 1:2 * n_pairs:2]
        assert (vals == value_of[keys]).all() and (keys < K).all()
        assert all(len(set(r)) == n_pairs for r in keys)                # distinct keys shown
        rows, cols = np.nonzero(tg != IGNORE_INDEX)
        assert (cols > 2 * n_pairs).all() and (toks[rows, cols] < K).all()  # scored at queries
        # lookup in context: the value written after the same key earlier in the row
        pred = np.array([vals[r][list(keys[r]).index(toks[r, c])] for r, c in zip(rows, cols)])
        assert (pred == tg[rows, cols]).all()
    assert not np.array_equal(s.tasks[0].info["value_of"], s.tasks[1].info["value_of"])
    assert s.tasks[0].chance == pytest.approx(1 / K)


# ---- modular-arithmetic -------------------------------------------------------------------------

def _equations(batch, p):
    toks, tg = batch.tokens.numpy(), batch.targets.numpy()
    rows, cols = np.nonzero(tg != IGNORE_INDEX)
    return toks[rows, cols - 3], toks[rows, cols - 1], tg[rows, cols], toks[rows, cols]


def test_modular_arithmetic_answers_and_heldout_pairs():
    p = 13
    s = small("modular-arithmetic")
    expected = {"a+b": lambda a, b: (a + b) % p, "a-b": lambda a, b: (a - b) % p,
                "a*b": lambda a, b: (a * b) % p}
    assert [t.info["operation"] for t in s.tasks] == list(expected)
    for task, f in zip(s.tasks, expected.values()):
        a, b, c, eq = _equations(task.eval_set(), p)
        assert (eq == p + 1).all() and (c == f(a, b)).all()
        assert len(a) == 128 * 6                                 # 31 tokens hold 6 equations
        eval_pairs = set((a * p + b).tolist())
        assert eval_pairs <= set(task.info["eval_pairs"].tolist())
        tr = next(task.train_batches(64, seed=0))
        ta, tb, tc, _ = _equations(tr, p)
        assert (tc == f(ta, tb)).all()
        assert not eval_pairs & set((ta * p + tb).tolist()), "eval pair seen in training"
    # a*b mod 13: 0 answers 25 of 169 pairs; the chance is the held-out majority frequency
    pairs = s.tasks[2].info["eval_pairs"]
    counts = np.bincount((pairs // p) * (pairs % p) % p, minlength=p)
    assert s.tasks[2].chance == pytest.approx(counts.max() / len(pairs))


# ---- digits ------------------------------------------------------------------------------------

def _digit_labels(batch, stream):
    off = stream.tasks[0].info["label_token_offset"]
    return batch.targets[:, 64] - off


def _one_nn_accuracy(task, stream):
    tr = next(task.train_batches(400, seed=0))
    ev = task.eval_set()
    x_tr, x_ev = tr.tokens[:, :64].float(), ev.tokens[:, :64].float()
    nearest = torch.cdist(x_ev, x_tr).argmin(1)
    return float((tr.targets[nearest, 64] == ev.targets[:, 64]).float().mean())


def test_split_digits_classes_layout_split_and_learnability():
    s = small("split-digits")
    assert s.vocab_size == 29 and s.seq_len == 65
    for t, task in enumerate(s.tasks):
        for batch in (task.eval_set(), next(task.train_batches(64, seed=1))):
            labels = _digit_labels(batch, s)
            assert set(labels.tolist()) == {2 * t, 2 * t + 1}
            assert (batch.tokens[:, :64] <= 16).all() and (batch.tokens[:, 64] == 17).all()
            assert (batch.targets[:, :64] == IGNORE_INDEX).all()
        assert not set(task.info["train_idx"]) & set(task.info["eval_idx"])
        assert _one_nn_accuracy(task, s) > task.chance + 0.3


def test_permuted_digits_task0_identity_pixel_permutations_and_learnability():
    s = small("permuted-digits")
    e0 = s.tasks[0].eval_set()
    assert np.array_equal(s.tasks[0].info["permutation"], np.arange(64))
    assert set(_digit_labels(e0, s).tolist()) == set(range(10))
    for task in s.tasks[1:]:
        perm = task.info["permutation"]
        assert sorted(perm) == list(range(64)) and not np.array_equal(perm, np.arange(64))
        e = task.eval_set()
        assert torch.equal(e.tokens[:, :64], e0.tokens[:, :64][:, perm])
        assert torch.equal(e.targets, e0.targets)
    assert _one_nn_accuracy(s.tasks[1], s) > s.tasks[1].chance + 0.5


def test_digits_quantisation_levels():
    s = build_stream("split-digits", num_tasks=1, seed=0, levels=4)
    b = s.tasks[0].eval_set()
    assert s.vocab_size == 16 and b.tokens[:, :64].max() == 3 and (b.tokens[:, 64] == 4).all()


# ---- text-domains ------------------------------------------------------------------------------

def test_text_domains_windows_come_from_their_split_and_bigrams_beat_chance():
    s = small("text-domains")
    assert s.vocab_size == 256 and [t.name for t in s.tasks] == ["english-prose", "python-source"]
    from nlbench.tasks.text import _domain_bytes
    for task in s.tasks:
        info = task.info
        data = _domain_bytes(task.name, 200_000)
        assert not set(info["eval_blocks"]) & set(info["train_blocks"])
        region = lambda blocks: [data[i * 4096:(i + 1) * 4096] for i in blocks]
        ev_region, tr_region = region(info["eval_blocks"]), region(info["train_blocks"])
        ev = task.eval_set()
        tr = next(task.train_batches(64, seed=0))
        for row in ev.tokens[:16]:
            assert any(bytes(row.tolist()) in blk for blk in ev_region)
        for row in tr.tokens[:16]:
            assert any(bytes(row.tolist()) in blk for blk in tr_region)
        # a bigram table fitted on training windows predicts held-out bytes far above chance
        counts = torch.zeros(256, 256)
        for _, b in zip(range(20), task.train_batches(64, seed=1)):
            counts.index_put_((b.tokens.reshape(-1), b.targets.reshape(-1)),
                              torch.ones(b.tokens.numel()), accumulate=True)
        acc = scored_acc(counts.argmax(1)[ev.tokens], ev.targets)
        assert acc > task.chance + 0.05, (task.name, acc, task.chance)
    assert s.tasks[0].chance != s.tasks[1].chance


# ---- passkey -----------------------------------------------------------------------------------

def test_passkey_lengths_grow_and_copying_the_needle_solves_it():
    s = small("passkey")
    F, n = 16, 4
    KEY, QUERY, PAD = F + 10, F + 11, F + 12
    lengths = []
    for task in s.tasks:
        ev = task.eval_set()
        toks, tg = ev.tokens.numpy(), ev.targets.numpy()
        lengths.append(task.info["length"])
        assert ((tg != IGNORE_INDEX).sum(1) == n).all()
        depths = []
        for r in range(len(toks)):
            k = int(np.flatnonzero(toks[r] == KEY)[0])
            q = int(np.flatnonzero(toks[r] == QUERY)[0])
            depths.append(k)
            pred = np.full(toks.shape[1], -1)
            pred[q:q + n] = toks[r, k + 1:k + 1 + n]                # copy the needle
            m = tg[r] != IGNORE_INDEX
            assert (pred[m] == tg[r][m]).all() and m[q:q + n].all()
            filler = np.delete(toks[r, :q], range(k, k + n + 1))
            assert (filler < F).all() and (np.diff(filler) % F == 1).all()   # unbroken cycle
        assert len(set(depths)) > 3
        L = task.info["length"]
        assert (toks[:, L:] == PAD).all() and (toks[:, :L] != PAD).all()
    assert lengths[0] == 20 and lengths[-1] == 49 and lengths == sorted(set(lengths))


# ---- bad values --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, words", [
    (lambda: build_stream("markov"), ["name", "markov-languages", "passkey"]),
    (lambda: build_stream("passkey", depth=3), ["depth", "key_digits", "min_len"]),
    (lambda: build_stream("split-digits", num_tasks=6), ["num_tasks", "5"]),
    (lambda: build_stream("split-digits", seq_len=64), ["seq_len", "65"]),
    (lambda: build_stream("associative-recall", seq_len=10, n_pairs=8), ["seq_len", "18"]),
    (lambda: build_stream("modular-arithmetic", num_tasks=9), ["num_tasks", "a+b"]),
    (lambda: build_stream("markov-languages", order=3), ["order", "[1, 2]"]),
    (lambda: build_stream("markov-languages", vocab_size=512, order=2), ["vocab_size", "65536"]),
    (lambda: build_stream("markov-languages", num_tasks=0), ["num_tasks", "[1, 1000]"]),
    (lambda: build_stream("markov-languages", seq_len=True), ["seq_len"]),
    (lambda: build_stream("passkey", seed=-1), ["seed"]),
    (lambda: build_stream("passkey", seq_len=8, key_digits=5), ["seq_len", "13"]),
    (lambda: build_stream("text-domains", num_tasks=50), ["num_tasks", "english-prose"]),
    (lambda: build_stream("modular-arithmetic", holdout=1.5), ["holdout", "[0.0, 0.9]"]),
    (lambda: build_stream("permuted-tokens", vocab_size=2, order=1, branching=2, num_tasks=3),
     ["num_tasks", "permutation"]),
    (lambda: next(build_stream("passkey", num_tasks=1).tasks[0].train_batches(0)), ["batch_size"]),
])
def test_bad_values_raise_clear_errors(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for w in words:
        assert w in str(err.value), (w, str(err.value))


# ---- mqar ---------------------------------------------------------------------------------------

def test_mqar_layout_per_sequence_maps_and_in_context_lookup_solves_it():
    s = small("mqar")
    K, V, n_pairs = 8, 8, 6
    assert s.vocab_size == 3 * (K + V) + 2
    blocks = []
    for t, task in enumerate(s.tasks):
        ev = task.eval_set()
        toks, tg = ev.tokens.numpy(), ev.targets.numpy()
        keys, vals = toks[:, 0:2 * n_pairs:2], toks[:, 1:2 * n_pairs:2]
        k0, v0 = t * (K + V), t * (K + V) + K
        assert ((keys >= k0) & (keys < k0 + K)).all() and ((vals >= v0) & (vals < v0 + V)).all()
        assert all(len(set(r)) == n_pairs for r in keys) and all(len(set(r)) == n_pairs for r in vals)
        rows, cols = np.nonzero(tg != IGNORE_INDEX)
        assert (cols > 2 * n_pairs).all() and ((toks[rows, cols] >= k0) & (toks[rows, cols] < k0 + K)).all()
        assert (np.bincount(rows) == task.info["n_queries"]).all()           # several queries per row
        pred = np.array([vals[r][list(keys[r]).index(toks[r, c])] for r, c in zip(rows, cols)])
        assert (pred == tg[rows, cols]).all()                                # lookup in context solves it
        # the map changes with every sequence: the best FIXED key -> value map (what a model could
        # memorise in its weights, all that associative-recall needs) stays near chance
        q, a = toks[rows, cols], tg[rows, cols]
        best_fixed = sum(np.bincount(a[q == k]).max() for k in np.unique(q)) / len(a)
        assert best_fixed < task.chance + 0.15, best_fixed
        assert task.chance == pytest.approx(1 / V) and task.ceiling == 1.0
        blocks.append(set(np.unique(toks[:, :2 * n_pairs])))
    assert not blocks[0] & blocks[1] and not blocks[1] & blocks[2]          # each task its own tokens


def test_mqar_errors_name_the_knob():
    with pytest.raises(ValueError, match="n_pairs"):
        build_stream("mqar", n_keys=4, n_values=8, n_pairs=5)
    with pytest.raises(ValueError, match="seq_len.*18"):
        build_stream("mqar", seq_len=10, n_pairs=8)


# ---- split-digits-task ----------------------------------------------------------------------------

def test_split_digits_task_same_data_as_split_digits_with_a_per_task_output_mask():
    from nlbench.tasks.base import restrict_to_group

    ci, ti = small("split-digits"), small("split-digits-task")
    assert ci.output_groups is None and ti.vocab_size == ci.vocab_size
    for a, b in zip(ci.tasks, ti.tasks):
        assert same(a.eval_set(), b.eval_set()) and same(next(a.train_batches(4, 3)), next(b.train_batches(4, 3)))
        assert b.output_groups is ti.output_groups
    label0 = ti.tasks[0].info["label_token_offset"]
    groups = ti.output_groups
    assert groups[label0:label0 + 10].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert (groups[:label0] == -1).all() and (groups[label0 + 10:] == -1).all()
    # a row of task 1 (classes 2, 3) whose logits favour class 9: masked, only labels 2 and 3 compete
    ev = ti.tasks[1].eval_set()
    targets = ev.targets[:1]
    pos = int((targets[0] != IGNORE_INDEX).nonzero()[0])
    logits = torch.zeros(1, targets.shape[1], ti.vocab_size)
    logits[0, pos, label0 + 9] = 10.0
    logits[0, pos, label0 + 2], logits[0, pos, label0 + 3] = 1.0, 2.0
    masked = restrict_to_group(logits, targets, groups)
    assert int(masked[0, pos].argmax()) == label0 + 3 and int(logits[0, pos].argmax()) == label0 + 9
    finite = torch.isfinite(masked[0, pos]).nonzero().flatten().tolist()
    assert finite == [label0 + 2, label0 + 3]
    assert torch.equal(masked[0, pos - 1], logits[0, pos - 1])              # unscored positions untouched
    # the loss is the two-way cross-entropy over the task's own labels
    from nlbench.protocol.evaluate import lm_loss
    y = int(targets[0, pos])
    two = torch.tensor([1.0, 2.0])
    want = -torch.log_softmax(two, 0)[y - (label0 + 2)]
    assert float(lm_loss(logits, targets, groups)) == pytest.approx(float(want), rel=1e-6)


# ---- recurring ------------------------------------------------------------------------------------

def test_recurring_stream_a_b_a_c_a_same_eval_new_batches():
    from nlbench.tasks import recurrence_positions

    s = small("recurring")
    base = build_stream("permuted-digits", num_tasks=3, seed=0, eval_size=128)
    assert [t.name.split(":")[0] for t in s.tasks] == ["A", "B", "A", "C", "A"]
    assert [t.info["source"] for t in s.tasks] == [0, 1, 0, 2, 0]
    assert [t.info["exposure"] for t in s.tasks] == [1, 1, 2, 1, 3]
    for p, src in enumerate([0, 1, 0, 2, 0]):
        assert same(s.tasks[p].eval_set(), base.tasks[src].eval_set())     # the base task's held-out set
        assert s.tasks[p].chance == base.tasks[src].chance
    assert not same(s.tasks[0].eval_set(), s.tasks[1].eval_set())
    a1, a2 = next(s.tasks[0].train_batches(8, 0)), next(s.tasks[2].train_batches(8, 0))
    assert not same(a1, a2)                                                 # a re-exposure draws new batches
    assert recurrence_positions("recurring", 5) == [[0, 2, 4]]
    assert recurrence_positions("recurring", 6) == [[0, 2, 4]]
    assert recurrence_positions("permuted-digits", 5) == []
    other = build_stream("recurring", num_tasks=3, seq_len=32, seed=0, eval_size=16,
                         base="markov-languages", base_options=dict(vocab_size=16, order=1))
    assert other.kind == "accuracy" and other.vocab_size == 16 and len(other.tasks) == 3


def test_recurring_errors_name_the_knob():
    with pytest.raises(ValueError, match="num_tasks"):
        build_stream("recurring", num_tasks=2)
    with pytest.raises(ValueError, match="base.*allowed values"):
        build_stream("recurring", base="text-domains")
    with pytest.raises(ValueError, match="base_options.*seq_len"):
        build_stream("recurring", base_options=dict(seq_len=12))
    with pytest.raises(ValueError, match="base 'markov-languages'.*order"):
        build_stream("recurring", base="markov-languages", seq_len=32, base_options=dict(order=9))
    with pytest.raises(ValueError, match="unknown `base_options` colour.*allowed: vocab_size"):
        build_stream("recurring", base="markov-languages", base_options=dict(colour=1))


def test_capability_streams_are_marked_in_the_registry():
    from nlbench.tasks import capability_streams

    assert set(capability_streams()) == {"passkey", "modular-arithmetic", "text-domains"}
    assert {STREAMS[n].measures for n in NAMES} == {"forgetting", "capability"}
