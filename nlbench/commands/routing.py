"""`nlbench routing`: which optimizer trains how many elements of each model.

Prints, per model and outer optimizer, the element count routed to the named optimizer and to
AdamW (`nlbench.optim.routing`), and the share of the hidden weight matrices (everything with
ndim >= 2 except the token embedding and LM head) that the named optimizer gets.
"""

from __future__ import annotations

import click

@click.command(help="Print how many elements of each model each outer optimizer trains (AdamW gets the rest).")
@click.option("--model", "models", multiple=True, help="a model of MODELS (repeatable; default: all)")
@click.option("--optimizer", "optimizers", multiple=True, help="muon, m3, dgd or adamw (repeatable; default: muon, m3)")
@click.option("--size", default="tiny", show_default=True, help="model size preset")
@click.option("--vocab-size", default=256, show_default=True, type=click.IntRange(min=2))
def routing(models, optimizers, size, vocab_size):
    from rich.console import Console
    from rich.table import Table

    from nlbench.models import MODELS, build_model
    from nlbench.optim import OPTIMIZERS, routing as routing_of
    from nlbench.optim.build import adamw_role_ids

    for m in models:
        if m not in MODELS:
            raise click.UsageError(f"--model {m!r} is not a registered model; choose from {', '.join(MODELS)}.")
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise click.UsageError(f"--optimizer {o!r} is not an outer optimizer; choose from {', '.join(OPTIMIZERS)}.")
    table = Table(title=f"elements per optimizer ({size})")
    for col in ("model", "optimizer", "on it", "on AdamW", "share of hidden matrices"):
        table.add_column(col, justify="left" if col in ("model", "optimizer") else "right")
    for m in models or MODELS:
        try:
            model = build_model(m, size=size, vocab_size=vocab_size)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        params = dict(model.named_parameters())
        special = adamw_role_ids(model)
        for o in optimizers or ("muon", "m3"):
            routed = routing_of(o, model)
            on = sum(params[n].numel() for n, r in routed if r == o)
            off = sum(params[n].numel() for n, r in routed if r != o)
            hidden = [n for n, _ in routed if params[n].ndim >= 2 and id(params[n]) not in special]
            total = sum(params[n].numel() for n in hidden)
            share = sum(params[n].numel() for n, r in routed if r == o and n in set(hidden)) / total if total else 1.0
            table.add_row(m, o, f"{on:,}", f"{off:,}", f"{share:.1%}")
    Console(width=120).print(table)
