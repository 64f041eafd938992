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
    "nlbench.tune.config:TuneConfigError",
    "nlbench.selection.config:LeaderboardConfigError",
    "nlbench.bench.bench_config:BenchConfigError",
    "nlbench.report.load:ReportError",
    "nlbench.metrics:MetricsError",
    "nlbench.models.options:ModelConfigError",
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


def validation_text(e, intro: str, *, known_keys=None, tags: tuple[str, ...] = ()) -> str:
    """A pydantic ValidationError as one paragraph: every failing field by dotted path, with
    pydantic's reason (our validators put the allowed values in the reason).

    known_keys(loc) -> the keys allowed where an unknown key was found (named in the message);
    tags: the tags of discriminated unions (e.g. tune's parameter types) — pydantic puts the tag
    into the path, which the user never wrote, and names it when it is missing or unknown."""
    parts = []
    for err in e.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-")))]
        if tags:
            loc = [p for i, p in enumerate(loc) if not (p in tags and 0 < i < len(loc) - 1)]
        where = ".".join(str(p) for p in loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (remove it or check its spelling)"
            known = known_keys(err["loc"][:-1]) if known_keys else []
            if known:
                msg += f"; allowed keys here: {_allowed(known)}"
        elif err["type"] == "union_tag_invalid":
            given = err["input"].get("type") if isinstance(err["input"], dict) else err["input"]
            msg = f"unknown parameter type {given!r}; allowed types: {_allowed(tags)}"
        elif err["type"] == "union_tag_not_found":
            msg = f"missing 'type'; allowed types: {_allowed(tags)}"
        elif err["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be one of") + f", got {err.get('input')!r}"
        elif msg.startswith("Input should be"):
            msg = msg.replace("Input should be", "must be") + f", got {err.get('input')!r}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"field '{where or '<root>'}': {msg}")
    return f"{intro}: " + "; ".join(parts) + "."


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in values)
