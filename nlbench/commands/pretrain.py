"""`nlbench pretrain CONFIG --out OUT`: compute the pretrained checkpoints an experiment names.

Reads CONFIG's `pretrain:` block, lists the distinct checkpoints its runs need (one per content
key of model name, size, options and the resolved block), and computes the missing ones into
OUT/pretrained/<key>/ — as Ray tasks (embedded Ray, or the cluster at --address), or in this
process with --sequential. `nlbench run CONFIG --out OUT` later finds them there; it computes a
missing one itself (once, under a lock). Interrupted pretrainings resume from their last
progress checkpoint.
"""

from __future__ import annotations

import sys

import click

HELP = """Meta-train the outer weights the runs of CONFIG start from, into OUT/pretrained/.

\b
CONFIG is an experiment config with a `pretrain:` block; every key, at its default:
  pretrain:
    stream: {name: markov-languages, seq_len: 128}  # default: each run's own stream
    tasks: fresh            # a new generated task per segment; N: a pool of N tasks
                            # (generator seeds from 2^62 up: never an evaluated task)
    steps: 300              # optimizer steps
    batch_size: 8
    segments: 4             # task segments per meta-sequence
    segment_sequences: 2    # sequences per segment; fast state carried across all of them
    tbptt: 2                # sequences per truncated-backprop window
    probe_weight: 0.0       # > 0: meta-continual loss on probes of earlier segments
    optimizer: {name: adamw, lr: 1e-3}
    grad_clip: 1.0
    seed: 0                 # or "run": one pretraining per run seed
    checkpoint_every: 50    # progress saved every N steps (not part of the key)
    dtype: float32
\b
The whole path (configs/in-context-cpu.yaml; README "In-context learning" for times):
  nlbench pretrain CONFIG --out OUT     # this command (optional: `run` computes a missing one)
  nlbench run CONFIG --out OUT          # stream the tasks from the checkpoints
  nlbench report OUT                    # leaderboard with in-context sections, retention figures
\b
Measured limits (docs/decisions.md): Titans-LMM pretraining on associative-recall with AdamW
at 3e-3 went to NaN at step 111 (whole-meta-sequence `tbptt`) and at step 136 (`tbptt` 2),
hence the 1e-3 default; Hope's in-context CMS overflows at the default `cms_lr` 0.5 (the
configs set 0.1). A diverged pretraining is recorded and fails at once on the next call until
its failed.txt is deleted.
\b
Each distinct (model, size, options, block) is computed once and reused by every run that
names it: `nlbench run CONFIG --out OUT` then starts both protocols from it (in_context:
outer weights frozen; finetune: fine-tuned) and records its key in the runs table's
`pretrain` column. Already finished checkpoints are skipped; interrupted ones resume."""


@click.command(help=HELP)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Results directory; checkpoints go to OUT/pretrained/<key>/.")
@click.option("--address", default=None, help="Ray cluster to join ('auto', 'ray://host:10001', 'host:port'); default: embedded Ray.")
@click.option("--sequential", is_flag=True, help="Compute in this process one after the other, without Ray.")
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]), help="Device (--sequential only; default cpu).")
def pretrain(config, out, address, sequential, device):
    from pathlib import Path

    from nlbench.config import ConfigError, expand_runs, load_config
    from nlbench.pretrain.remote import pretrain_jobs

    try:
        cfg = load_config(config)
        specs = expand_runs(cfg)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    jobs = pretrain_jobs(specs)
    if not jobs:
        click.echo(f"error: config '{config}' has no `pretrain:` block, so its runs name no pretrained checkpoint "
                   f"(see `nlbench pretrain --help` for the block's fields).", err=True)
        sys.exit(2)
    if sequential and address:
        click.echo("error: --sequential computes in this process; it cannot be combined with --address.", err=True)
        sys.exit(2)
    if device and not sequential:
        click.echo("error: --device applies to --sequential; Ray tasks use a GPU when resources.gpus_per_run > 0.", err=True)
        sys.exit(2)
    root = Path(out) / "pretrained"
    click.echo(f"config {cfg.name}: {len(jobs)} pretrained checkpoint(s) for {len(specs)} run(s) -> {root}")
    errors = {}
    if sequential:
        from nlbench.pretrain.store import PretrainError, ensure_pretrained

        for key, (model, block) in jobs.items():
            try:
                every = max(1, int(block["steps"]) // 10)

                def progress(done, total, row, key=key, every=every):
                    if done % every == 0 or done == total:
                        click.echo(f"  {key} step {done}/{total}: loss {row['loss']:.3f} (first segment "
                                   f"{row['first_segment_loss']:.3f}, later {row['later_segment_loss']:.3f})")

                _, computed = ensure_pretrained(model, block, root, device=device or "cpu", progress=progress)
                click.echo(f"{'computed' if computed else 'reused'} {key} ({model['name']}/{model['size']})")
            except (PretrainError, RuntimeError, ValueError) as e:
                errors[key] = str(e)
    else:
        import ray

        from nlbench.execution import connect
        from nlbench.pretrain.remote import run_pretrain_jobs

        res = cfg.resources
        started = connect(address)
        try:
            errors = run_pretrain_jobs(jobs, root, cpus=res.cpus_per_run, gpus=res.gpus_per_run,
                                       max_failures=res.max_failures)
        finally:
            if started:
                ray.shutdown()
    _print_table(jobs, root, errors)
    sys.exit(1 if errors else 0)


def _print_table(jobs: dict, root, errors: dict) -> None:
    from nlbench.pretrain.store import MODEL_FILE, PretrainError, checkpoint_dir, executions, read_safe, FORMAT

    for key, (model, block) in jobs.items():
        if key in errors:
            click.echo(f"failed   {key} {model['name']}/{model['size']}: {errors[key]}", err=True)
            continue
        try:
            meta = read_safe(checkpoint_dir(root, key) / MODEL_FILE, FORMAT)
        except PretrainError as e:
            click.echo(f"failed   {key}: {e}", err=True)
            continue
        hist = meta["history"]
        last = hist[-1] if hist else {}
        click.echo(f"ok       {key} {model['name']}/{model['size']} on {block['stream']['name']}: {len(hist)} steps, "
                   f"train {meta['train_s']:.1f}s, last loss {last.get('loss', float('nan')):.3f} "
                   f"(first segment {last.get('first_segment_loss', float('nan')):.3f}, later "
                   f"{last.get('later_segment_loss', float('nan')):.3f}), executions {executions(root, key)}")
