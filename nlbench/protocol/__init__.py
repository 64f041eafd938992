"""Continual-learning protocols: how a model meets a stream of tasks.

    from nlbench.protocol import build_protocol
    proto = build_protocol(config, model, stream, device)     # config: a RunSpec.config
    result = proto.run()                                       # ProtocolResult: matrix, curves, …

- `finetune` (finetune.py): the outer optimizer trains on task 0, 1, …; strategies naive,
  replay, ewc (strategies.py).
- `in_context` (in_context.py): outer parameters frozen, the fast state is carried along.
The shared task loop, evaluation cadence and checkpoint state are in loop.py; scoring, the
loss and the divergence check in evaluate.py.
"""

from __future__ import annotations

from nlbench.protocol.evaluate import Diverged, evaluate, evaluate_with_state, lm_loss
from nlbench.protocol.finetune import Finetune
from nlbench.protocol.in_context import InContext
from nlbench.protocol.loop import METRICS, Progress, Protocol, ProtocolResult
from nlbench.protocol.strategies import EWC, STRATEGIES, Naive, Replay, build_strategy

PROTOCOLS = {"finetune": Finetune, "in_context": InContext}


def build_protocol(config: dict, model, stream, device, progress=None) -> Protocol:
    name = config["protocol"]
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(map(repr, PROTOCOLS))}, got {name!r}.")
    return PROTOCOLS[name](config, model, stream, device, progress)


__all__ = [
    "EWC", "METRICS", "PROTOCOLS", "STRATEGIES", "Diverged", "Finetune", "InContext", "Naive", "Progress",
    "Protocol", "ProtocolResult", "Replay", "build_protocol", "build_strategy", "evaluate",
    "evaluate_with_state", "lm_loss",
]
