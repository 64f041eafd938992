"""`markov-languages` and `permuted-tokens`: sparse random n-gram languages.

A language of order n (1 = bigram, 2 = trigram) over V tokens: every context of the last n tokens
allows `branching` distinct next tokens with Dirichlet(alpha) probabilities, the rest have
probability 0. The first n tokens of a sequence are uniform (no context yet) and are never
scored; every later token is a scored next-token label.

Exact figures, from the table by propagating the distribution of the context state along the
sequence (pi_{j+1}(s') = sum_s pi_j(s) P(s -> s'), pi_n uniform):
  ceiling = mean_j sum_s pi_j(s) max_v P(v | s)       (Bayes-optimal next-token accuracy)
  chance  = max_v mean_j sum_s pi_j(s) P(v | s)       (best constant answer: majority baseline)
the means running over the scored positions j = n..T.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import Stream, Task, check_float, check_int, rng_for, shift_targets

MAX_STATES = 1 << 16


class MarkovLanguage:
    def __init__(self, rng: np.random.Generator, vocab_size: int, order: int, branching: int,
                 alpha: float):
        self.vocab_size, self.order, self.branching = vocab_size, order, branching
        self.num_states = vocab_size ** order
        # k distinct next tokens per context: the first k of a random ordering of the vocabulary
        next_tokens = np.argsort(rng.random((self.num_states, vocab_size)), axis=1)[:, :branching]
        self._set_table(next_tokens, rng.dirichlet(np.full(branching, alpha), size=self.num_states))

    @classmethod
    def from_table(cls, vocab_size: int, order: int, next_tokens, probs) -> "MarkovLanguage":
        """A language with a given table: next_tokens int[S, k], probs float[S, k], S = V**order."""
        lang = cls.__new__(cls)
        lang.vocab_size, lang.order = vocab_size, order
        lang.num_states = vocab_size ** order
        lang.branching = np.shape(next_tokens)[1]
        lang._set_table(np.asarray(next_tokens, dtype=np.int64), np.asarray(probs, dtype=float))
        return lang

    def _set_table(self, next_tokens, probs):
        self.next_tokens, self.probs = next_tokens, probs
        self.cum_probs = np.cumsum(self.probs, axis=1)
        self.cum_probs[:, -1] = 1.0   # no rounding gap above the last bucket
        best = np.argmax(self.probs, axis=1)
        self.bayes_next = self.next_tokens[np.arange(self.num_states), best]

    def state_of(self, context: np.ndarray) -> np.ndarray:
        """context int[..., order] (oldest first) -> state id."""
        state = np.zeros(context.shape[:-1], dtype=np.int64)
        for i in range(self.order):
            state = state * self.vocab_size + context[..., i]
        return state

    def sample(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """n sequences of `length` tokens."""
        seq = np.empty((n, length), dtype=np.int64)
        seq[:, :self.order] = rng.integers(0, self.vocab_size, size=(n, self.order))
        state = self.state_of(seq[:, :self.order])
        rows = np.arange(n)
        for j in range(self.order, length):
            u = rng.random(n)
            choice = (u[:, None] > self.cum_probs[state]).sum(axis=1)
            tok = self.next_tokens[state, choice]
            seq[:, j] = tok
            state = (state * self.vocab_size + tok) % self.num_states
        return seq

    def scored_mask(self, n: int, length: int) -> np.ndarray:
        mask = np.zeros((n, length), dtype=bool)
        mask[:, self.order:] = True
        return mask

    def exact_chance_and_ceiling(self, length: int) -> tuple[float, float]:
        """Majority-baseline and Bayes accuracies over labels at positions order..length-1."""
        S, V, k = self.num_states, self.vocab_size, self.branching
        pi = np.full(S, 1.0 / S)
        max_p = self.probs.max(axis=1)
        src = np.repeat(np.arange(S), k)
        tok = self.next_tokens.reshape(-1)
        dst = (src * V + tok) % S
        marginal = np.zeros(V)
        bayes = 0.0
        positions = length - self.order
        for _ in range(positions):
            w = (pi[:, None] * self.probs).reshape(-1)
            marginal += np.bincount(tok, weights=w, minlength=V)
            bayes += float(pi @ max_p)
            pi = np.bincount(dst, weights=w, minlength=S)
        return float(marginal.max() / positions), float(bayes / positions)

    def bayes_predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bayes-optimal next-token prediction at every position t >= order-1 of tokens[B, T]
        (positions without a full context get -1)."""
        x = tokens.numpy()
        pred = np.full(x.shape, -1, dtype=np.int64)
        n = self.order
        if x.shape[1] >= n:
            windows = np.lib.stride_tricks.sliding_window_view(x, n, axis=1)  # [B, T-n+1, n]
            pred[:, n - 1:] = self.bayes_next[self.state_of(windows)]
        return torch.from_numpy(pred)


def _language_knobs(where, vocab_size, order, branching, alpha):
    vocab_size = check_int("vocab_size", vocab_size, 2, 4096, where=where)
    order = check_int("order", order, 1, 2, where=where, why="(1 = bigram, 2 = trigram)")
    branching = check_int("branching", branching, 1, vocab_size, where=where,
                          why="(next tokens allowed per context, at most vocab_size)")
    if vocab_size ** order > MAX_STATES:
        raise ValueError(f"{where}: `vocab_size` ** `order` (number of contexts) must be at most "
                         f"{MAX_STATES}; got {vocab_size}**{order} = {vocab_size ** order}. "
                         f"Use a smaller vocab_size or order=1.")
    alpha = check_float("alpha", alpha, 0.0, 1e6, where=where, lo_open=True)
    return vocab_size, order, branching, alpha


def build_markov_languages(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
                           vocab_size: int = 32, order: int = 2, branching: int = 4,
                           alpha: float = 1.0) -> Stream:
    where = "stream 'markov-languages'"
    vocab_size, order, branching, alpha = _language_knobs(where, vocab_size, order, branching, alpha)
    check_int("seq_len", seq_len, order, None, where=where, why=f"(order={order} tokens of context "
              f"precede the first scored label)")
    tasks = []
    for t in range(num_tasks):
        lang = MarkovLanguage(rng_for(seed, "markov-languages", "table", t), vocab_size, order,
                              branching, alpha)
        tasks.append(_language_task(t, f"markov-{t}", lang, seq_len, eval_size,
                                    seed_key=(seed, "markov-languages", t),
                                    eval_key=(seed, "markov-languages", t, "eval")))
    return Stream("markov-languages", vocab_size, seq_len, "accuracy", tasks, seed,
                  dict(vocab_size=vocab_size, order=order, branching=branching, alpha=alpha))


def _language_task(index, name, lang, seq_len, eval_size, seed_key, eval_key,
                   permutation: np.ndarray | None = None) -> Task:
    length = seq_len + 1
    perm = np.arange(lang.vocab_size) if permutation is None else permutation

    def sample(rng, n):
        return shift_targets(perm[lang.sample(rng, n, length)], lang.scored_mask(n, length))

    def build_eval():
        return sample(rng_for(*eval_key), eval_size)

    chance, ceiling = lang.exact_chance_and_ceiling(length)
    return Task(index=index, name=name, chance=chance, ceiling=ceiling, seed_key=seed_key,
                train_sampler=sample, eval_builder=build_eval,
                info=dict(language=lang, permutation=torch.from_numpy(perm.copy())))


def build_permuted_tokens(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
                          vocab_size: int = 32, order: int = 2, branching: int = 4,
                          alpha: float = 1.0) -> Stream:
    """One base language; task t relabels every token through a fixed permutation sigma_t
    (sigma_0 = identity), so chance and ceiling are those of the base language. The eval sets
    are the same base sequences relabelled: eval_t.tokens = sigma_t[eval_0.tokens]."""
    where = "stream 'permuted-tokens'"
    vocab_size, order, branching, alpha = _language_knobs(where, vocab_size, order, branching, alpha)
    check_int("seq_len", seq_len, order, None, where=where, why=f"(order={order} tokens of context "
              f"precede the first scored label)")
    if vocab_size <= 12 and num_tasks > math.factorial(vocab_size):
        raise ValueError(f"{where}: `num_tasks` must be at most vocab_size! = "
                         f"{math.factorial(vocab_size)} (one distinct permutation per task); "
                         f"got {num_tasks}.")
    lang = MarkovLanguage(rng_for(seed, "permuted-tokens", "base"), vocab_size, order, branching,
                          alpha)
    identity = np.arange(vocab_size)
    seen = {identity.tobytes()}
    tasks = []
    for t in range(num_tasks):
        perm = identity
        if t > 0:
            prng = rng_for(seed, "permuted-tokens", "perm", t)
            perm = prng.permutation(vocab_size)
            while perm.tobytes() in seen:
                perm = prng.permutation(vocab_size)   # every task a distinct relabelling
            seen.add(perm.tobytes())
        tasks.append(_language_task(t, f"permuted-{t}", lang, seq_len, eval_size,
                                    seed_key=(seed, "permuted-tokens", t),
                                    eval_key=(seed, "permuted-tokens", "eval"), permutation=perm))
    return Stream("permuted-tokens", vocab_size, seq_len, "accuracy", tasks, seed,
                  dict(vocab_size=vocab_size, order=order, branching=branching, alpha=alpha))
