"""The Transformer's KV-cache window (`kv_window`), its in-context baseline."""

from __future__ import annotations

import pytest
import torch

from nlbench.models import ModelConfigError, build_model
from nlbench.protocol.evaluate import evaluate_with_state

V, T = 32, 16


def model(window, seed=0):
    torch.manual_seed(seed)
    return build_model("transformer", size="tiny", vocab_size=V, kv_window=window).eval()


def test_an_empty_cache_computes_what_the_stateless_model_computes_and_chunks_equal_one_call():
    x = torch.randint(0, V, (2, 2 * T))
    torch.manual_seed(0)
    plain = build_model("transformer", size="tiny", vocab_size=V).eval()
    full = model("full")
    assert torch.equal(plain(x).logits, full(x).logits)
    first = full(x[:, :T])
    second = full(x[:, T:], state=first.state)
    assert torch.allclose(torch.cat([first.logits, second.logits], 1), full(x).logits, atol=1e-5)
    assert [c["k"].shape[2] for c in second.state] == [2 * T, 2 * T]


def test_the_cache_keeps_the_last_window_tokens():
    m = model(24)
    state = None
    for _ in range(3):
        state = m(torch.randint(0, V, (2, T)), state=state).state
    assert [c["k"].shape for c in state] == [torch.Size([2, 2, 24, 32])] * 2
    with pytest.raises(ModelConfigError, match="kv_window"):
        build_model("transformer", vocab_size=V, kv_window=0)


@torch.no_grad()
def test_a_task_stops_mattering_once_it_has_left_the_window():
    """Stream task j, then task k: while j is in the window the probes of j differ from those of a
    stream that never saw j; once j has left (window = one sequence, two layers: after two
    sequences of k) they are bit-identical, so j's accuracy is what an unseen task gets."""
    m = model(T)
    task_j = torch.randint(0, V, (2, T))
    other = torch.randint(0, V, (2, T))
    k_seqs = [torch.randint(0, V, (2, T)) for _ in range(2)]
    probe = (torch.randint(0, V, (4, T)), torch.randint(0, V, (4, T)))

    def stream(first, n_k):
        state = m(first).state
        for x in k_seqs[:n_k]:
            state = m(x, state=state).state
        return state

    def logits(state):
        return m(probe[0][:2], state=state, update_state=False).logits

    assert not torch.equal(logits(stream(task_j, 1)), logits(stream(other, 1)))
    assert torch.equal(logits(stream(task_j, 2)), logits(stream(other, 2)))
    score = lambda s: evaluate_with_state(m, probe, s, streams=2, max_sequences=None,  # noqa: E731
                                          device=torch.device("cpu"))
    assert score(stream(task_j, 2)) == score(stream(other, 2))


@pytest.mark.slow
def test_a_pretrained_windowed_transformer_loses_task_j_once_j_has_left_its_window(tmp_path):
    """Meta-train the windowed Transformer on fresh deterministic bigram languages in short
    sequences (so the cache, not the sequence itself, holds the language), then stream unseen
    task j and task k: j's accuracy is high while j is in the window and falls once it has left."""
    from nlbench.pretrain import ensure_pretrained, load_pretrained, pretrain_key, resolve_block
    from nlbench.tasks import build_stream

    torch.set_num_threads(1)
    opts = dict(order=1, vocab_size=8, branching=1)
    block = resolve_block(dict(tasks="fresh", steps=300, batch_size=16, segments=2, segment_sequences=8, tbptt=8,
                               optimizer=dict(name="adamw", lr=3e-3)),
                          dict(name="markov-languages", seq_len=8, options=opts), seed=0)
    entry = dict(name="transformer", size="tiny", options=dict(kv_window=64))
    path, _ = ensure_pretrained(entry, block, tmp_path)
    m = build_model("transformer", vocab_size=8, kv_window=64).eval()
    load_pretrained(path, pretrain_key(entry, block), m)
    j, k = build_stream("markov-languages", num_tasks=2, seq_len=8, seed=0, eval_size=64, **opts).tasks

    @torch.no_grad()
    def feed(task, n, state):
        batches = task.train_batches(16, seed=1)
        for _ in range(n):
            state = m(next(batches).tokens, state=state).state
        return state

    def acc(state):
        return evaluate_with_state(m, j.eval_set(), state, streams=16, max_sequences=None,
                                   device=torch.device("cpu"))["accuracy"]

    in_window = acc(feed(j, 8, None))
    # 128 tokens of k: j has left the 64-token window in both layers (layer-1 keys of the first
    # 64 tokens of k were computed while layer 0 still held j)
    left = acc(feed(k, 16, feed(j, 8, None)))
    never = acc(feed(k, 16, None))
    print(f"task j in window {in_window:.3f}, after it left {left:.3f}, never seen {never:.3f}, chance {j.chance}")
    assert in_window > j.chance + 0.2
    assert left < in_window - 0.05
    assert left == never  # nothing of j is left
