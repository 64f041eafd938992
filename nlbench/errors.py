"""Errors a user can fix (a bad config, argument, address or output folder) and how the command
line shows them: one paragraph on stderr naming the problem, exit status 2, no traceback.

Each layer keeps its own error class (ConfigError, SweepError, ...); `user_errors()` lists them
so the CLI group catches them all in one place. Checks that run before any compute (an output
folder that cannot be written, a cluster address nothing answers at) raise `UserError`.
"""

from __future__ import annotations

import importlib
import sys


class UserError(ValueError):
    """A problem with the user's input, found before anything ran or was written."""


# "module:Class" of every error whose message is meant for the user as it stands
USER_ERRORS = (
    "nlbench.errors:UserError",
    "nlbench.config:ConfigError",
    "nlbench.execution:SweepError",
    "nlbench.results:ResultsError",
    "nlbench.tune:TuneConfigError",
    "nlbench.bench.bench_config:BenchConfigError",
    "nlbench.report.load:ReportError",
    "nlbench.metrics:MetricsError",
    "nlbench.models:ModelConfigError",
    "nlbench.pretrain.store:PretrainError",
    "nlbench.runner:CheckpointError",
    "nlbench.storage:StorageError",
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The USER_ERRORS classes of the modules already imported (a module never imported cannot
    have raised, and importing it here would slow every command down)."""
    out = []
    for entry in USER_ERRORS:
        module, name = entry.split(":")
        if module in sys.modules:
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type):
                out.append(cls)
    return tuple(out)


def one_paragraph(e: BaseException) -> str:
    """The error's message on one line (a user error's text is already a full sentence)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__
