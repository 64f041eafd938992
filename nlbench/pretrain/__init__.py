"""Pretraining (meta-training) of the outer weights before a continual stream.

    from nlbench.pretrain import ensure_pretrained, load_pretrained, pretrain_key
    path, computed = ensure_pretrained(model_entry, block, root)   # once per content key
    load_pretrained(path, pretrain_key(model_entry, block), model)

- config.py: the `pretrain:` block, its per-run resolution, the checkpoint key.
- tasks.py: the pretraining task pool (a seed space disjoint from every evaluated stream) and
  the meta-sequences (several task segments per row).
- train.py: the loop (state carried across segments, truncated backprop, meta-continual probes).
- store.py: checkpoints keyed by content, atomic, computed once under a lock, safe loading.
- remote.py: computing a sweep's pretrainings as Ray tasks before its runs.
"""

from nlbench.pretrain.config import PretrainConfig, pretrain_key, resolve_block
from nlbench.pretrain.store import PretrainError, ensure_pretrained, executions, load_pretrained
from nlbench.pretrain.tasks import PRETRAIN_SEED_BASE, pretrain_stream_seed

__all__ = ["PRETRAIN_SEED_BASE", "PretrainConfig", "PretrainError", "ensure_pretrained", "executions",
           "load_pretrained", "pretrain_key", "pretrain_stream_seed", "resolve_block"]
