"""In-context memory updates, one sub-package per operation and one module per form (the
layout of flash-linear-attention):

    dgd/            Hope's delta-gradient-descent memory (spec §2–§3): naive, chunk, chunk_grad,
                    solve, stacked, triton; its `__init__` chooses the memory kernel
    titans/         the Titans LMM (spec §1): naive, chunk
    cms/            the Continuum Memory System's in-context levels (spec §4): swiglu (closed-form
                    gradients), state (the block fold), naive, chunk
    activations.py  SiLU's derivatives for the hand-written gradients
    compiling.py    `torch.compile` of the per-chunk kernels, and the compile modes
"""
