"""nlbench.tasks: named, seeded, deterministic streams of continual-learning tasks.

    from nlbench.tasks import build_stream
    stream = build_stream("markov-languages", num_tasks=3, seq_len=64, seed=0)

See docs/ARCHITECTURE.md ("Tasks") for the contract and each family's module for its format.
"""
from .base import IGNORE_INDEX, Batch, Stream, Task, shift_targets
from .registry import (STREAMS, StreamSpec, build_stream, capability_streams, describe_streams,
                       recurrence_positions)

__all__ = ["STREAMS", "StreamSpec", "build_stream", "capability_streams", "describe_streams",
           "recurrence_positions", "Batch", "Stream", "Task",
           "IGNORE_INDEX", "shift_targets"]
