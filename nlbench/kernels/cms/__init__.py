"""Continuum Memory System in-context level updates (docs/ALGORITHMS.md §4), one module per form:

    swiglu.py  the level's SwiGLU with per-batch weights and its closed-form weight gradients
    state.py   the level state and how summed gradients fold into it (block update, nested reset)
    naive.py   token loop with a counter, the reference (`cms_level_reference`)
    chunk.py   one segment per block (`cms_level_chunked`), and the teach-signal fold (`cms_level_teach`)
"""

from __future__ import annotations

from nlbench.kernels.cms.chunk import cms_level_chunked, cms_level_teach
from nlbench.kernels.cms.naive import cms_level_reference
from nlbench.kernels.cms.swiglu import swiglu_apply, swiglu_grads, teach_grads

__all__ = ["cms_level_chunked", "cms_level_reference", "cms_level_teach", "swiglu_apply", "swiglu_grads",
           "teach_grads"]
