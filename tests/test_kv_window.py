"""The Transformer's KV-cache window (`kv_window`), its in-context baseline (issue 16)."""

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
