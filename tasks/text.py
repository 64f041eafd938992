"""`text-domains`: byte-level language modelling over text domains found in the Python install.

Domains, in this order (nothing is downloaded; a domain missing from an install is skipped):
  0 english-prose   the pydoc topic help (`pydoc_data.topics`), keys sorted
  1 python-source   the standard library's .py files
  2 docs-text       other text files of the standard library (LICENSE.txt, .txt, .rst, .html,
                    .css, .def: IDLE's NEWS/help, the email package notes, grammars, ...)
  3 c-headers       CPython's C headers (`sysconfig.get_paths()["include"]`, if installed)
File lists are walked in sorted order, skipping site-packages, tests and caches, and read until
`max_chars` bytes per domain, so a given install always yields the same corpus.

Each domain's UTF-8 bytes are cut into blocks of `block` bytes; a seeded `eval_fraction` of the
blocks is held out and never trained on. A sequence is a window of seq_len + 1 bytes inside one
block; every byte after the first is a scored label (vocab 256). kind = "lm": accuracy is
next-byte accuracy and the protocol also records the loss.

chance = frequency of the most common byte among the eval set's labels (majority baseline, on
the eval set); ceiling = None.
"""
from __future__ import annotations

import os
import sysconfig
from functools import lru_cache

import numpy as np

from .base import (Stream, Task, check_float, check_int, majority_accuracy, rng_for,
                   shift_targets)

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
             "lib-dynload"}
DOC_SUFFIXES = (".txt", ".rst", ".html", ".css", ".def")
MIN_BLOCKS = 8


def _walk(root: str | None, suffixes: tuple[str, ...]) -> list[str]:
    if not root or not os.path.isdir(root):
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(suffixes)]
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def _read_files(paths: list[str], max_chars: int) -> str:
    parts, total = [], 0
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def _prose(max_chars):
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return ""
    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]


def _python(max_chars):
    return _read_files(_walk(sysconfig.get_paths().get("stdlib"), (".py",)), max_chars)


def _docs(max_chars):
    return _read_files(_walk(sysconfig.get_paths().get("stdlib"), DOC_SUFFIXES), max_chars)


def _headers(max_chars):
    return _read_files(_walk(sysconfig.get_paths().get("include"), (".h",)), max_chars)


DOMAINS = {"english-prose": _prose, "python-source": _python, "docs-text": _docs,
           "c-headers": _headers}


@lru_cache(maxsize=16)
def _domain_bytes(name: str, max_chars: int) -> bytes:
    return DOMAINS[name](max_chars).encode("utf-8")[:max_chars]


def available_domains(max_chars: int = 1_000_000, block: int = 8192) -> list[str]:
    """Domains of this install with at least MIN_BLOCKS blocks of text, in stream order."""
    return [d for d in DOMAINS if len(_domain_bytes(d, max_chars)) >= MIN_BLOCKS * block]


def build_text_domains(*, num_tasks: int | None, seq_len: int, seed: int, eval_size: int,
                       max_chars: int = 1_000_000, block: int = 8192,
                       eval_fraction: float = 0.1) -> Stream:
    where = "stream 'text-domains'"
    max_chars = check_int("max_chars", max_chars, 16_384, 100_000_000, where=where,
                          why="(bytes read per domain)")
    block = check_int("block", block, 1024, max_chars // MIN_BLOCKS, where=where,
                      why=f"(held-out split granularity in bytes; at most max_chars / {MIN_BLOCKS})")
    eval_fraction = check_float("eval_fraction", eval_fraction, 0.05, 0.5, where=where)
    check_int("seq_len", seq_len, 1, block - 1, where=where,
              why=f"(a window of seq_len + 1 bytes must fit in one block of {block} bytes)")
    domains = available_domains(max_chars, block)
    if num_tasks is None:
        num_tasks = len(domains)
    check_int("num_tasks", num_tasks, 1, len(domains), where=where,
              why=f"(text domains available in this Python install: {', '.join(domains)})")
    length = seq_len + 1

    def make_task(t, domain):
        data = np.frombuffer(_domain_bytes(domain, max_chars), dtype=np.uint8).astype(np.int64)
        n_blocks = len(data) // block
        order = rng_for(seed, "text-domains", "split", domain).permutation(n_blocks)
        n_eval = max(1, int(round(eval_fraction * n_blocks)))
        eval_blocks, train_blocks = np.sort(order[:n_eval]), np.sort(order[n_eval:])

        def sampler(blocks):
            def sample(rng, n):
                starts = blocks[rng.integers(0, len(blocks), size=n)] * block \
                    + rng.integers(0, block - length + 1, size=n)
                seq = data[starts[:, None] + np.arange(length)[None, :]]
                return shift_targets(seq, np.ones_like(seq, dtype=bool))
            return sample

        eval_batch = sampler(eval_blocks)(rng_for(seed, "text-domains", domain, "eval"), eval_size)
        return Task(index=t, name=domain, chance=majority_accuracy(eval_batch.targets),
                    ceiling=None, seed_key=(seed, "text-domains", domain),
                    train_sampler=sampler(train_blocks), eval_builder=lambda: eval_batch,
                    info=dict(domain=domain, bytes=len(data), eval_blocks=eval_blocks,
                              train_blocks=train_blocks, block=block))

    tasks = [make_task(t, d) for t, d in enumerate(domains[:num_tasks])]
    return Stream("text-domains", 256, seq_len, "lm", tasks, seed,
                  dict(max_chars=max_chars, block=block, eval_fraction=eval_fraction))
