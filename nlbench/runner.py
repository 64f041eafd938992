"""One run, start to finish: `execute_run(spec) -> RunRecord`.

    record = execute_run(spec, checkpoint_dir=OUT / "checkpoints", device="cpu")
    record.run      # the `runs` row: status completed | failed | diverged (| stopped), timings, versions, …
    record.matrix   # accuracy / loss matrix rows incl. the init row (after_task = −1)
    record.curves   # learning-curve rows (train.eval_every)

`execute_run` never raises for a failing run: an exception becomes status `failed` with the
error and the tail of its traceback, a non-finite loss becomes `diverged` with the step.

Checkpoints: with `checkpoint_dir`, the state after each task (model, optimizer, strategy,
fast state, RNG states, rows so far, timings) is written atomically to
checkpoint_dir/<run_id>/last.pt, and a later call for the same run resumes after the last
finished task. Data iterators are seeded per (seed, task), so a resumed run computes exactly
what an undisturbed one does. The checkpoint is removed once the run has finished (completed or
diverged) and kept after a failure, to resume from.

`run_sequential(specs, out_dir)` runs specs one after the other in this process and writes
each record to the ResultStore under out_dir, skipping run ids already completed there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import socket
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nlbench.atomic import atomic_write
from nlbench.config import RunSpec, run_label
from nlbench.environment import available_cpus, device_label, git_sha, versions

CHECKPOINT_NAME = "last.pt"
TRACEBACK_CHARS = 4000
# status of a run halted by `stop_after_task`: an outcome, not a failure; its checkpoint resumes
# it. Never a results row (not among nlbench.results.RUN_STATUSES): only finished runs are written.
STOPPED = "stopped"


# ------------------------------------------------------------------------------ environment


def sequential_threads(cpus_per_run: float) -> int:
    """Torch threads of a `--sequential` run: its CPU share (the config's resources.cpus_per_run,
    as a Ray actor gets), at least one, at most the CPUs available - torch's default (every core
    it sees) oversubscribes a shared or quota-limited machine."""
    return max(1, min(int(cpus_per_run), available_cpus()))


def resolve_device(requested: str | None, config: dict) -> torch.device:
    """An explicit `requested` device wins over the config's train.device; 'auto' = cuda if any."""
    name = requested or config["train"].get("device", "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but torch sees no CUDA device; use device 'cpu' or 'auto'.")
    return dev


def _now() -> datetime:
    return datetime.now(timezone.utc)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ building


def build_run_stream(config: dict):
    from nlbench.tasks import build_stream

    s = config["stream"]
    kw = {k: s[k] for k in ("num_tasks", "seq_len") if s.get(k) is not None}
    return build_stream(s["name"], seed=int(config["seed"]), **kw, **s.get("options", {}))


def build_run_model(config: dict, vocab_size: int):
    from nlbench.models import build_model

    m = config["model"]
    return build_model(m["name"], size=m["size"], vocab_size=vocab_size, **m.get("options", {}))


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_path(checkpoint_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(checkpoint_dir) / run_id / CHECKPOINT_NAME


def save_checkpoint(path: Path, payload: dict | bytes) -> None:
    """torch.save (or the bytes of checkpoint_to_bytes), atomically (nlbench.atomic): a crash
    leaves the previous checkpoint or the new one, never a torn file. Private to the user (0o600),
    as the run's own state."""
    if isinstance(payload, bytes):
        atomic_write(path, lambda f: f.write(payload), private=True)
    else:
        atomic_write(path, lambda f: torch.save(payload, f), private=True)


class CheckpointError(RuntimeError):
    """A per-task checkpoint that cannot be trusted: unreadable, not plain data, or another run's."""


def load_checkpoint(path: Path, run_id: str) -> dict | None:
    """The run's last per-task checkpoint, or None. Read with `weights_only=True`: OUT may live
    on shared storage, so a planted file must never execute code (tensors and containers only)."""
    if not path.is_file():
        return None
    return checkpoint_from_bytes(path.read_bytes(), run_id, str(path), f"Delete {path.parent}")


def checkpoint_to_bytes(payload: dict) -> bytes:
    """A checkpoint payload as the bytes save_checkpoint would write (for a driver to store)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def checkpoint_from_bytes(data: bytes, run_id: str, source: str, delete: str = "Delete it") -> dict:
    """A checkpoint read from bytes with `weights_only=True` (nothing in it runs) and checked to be
    ``run_id``'s; ``source`` names where it came from in errors."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for code, EOFError/RuntimeError for torn files
        raise CheckpointError(
            f"checkpoint {source} of run {run_id} was refused: it is not a plain tensor checkpoint written by "
            f"nlbench ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}). Nothing in it "
            f"was run. {delete} to recompute the run from its start.") from None
    if not isinstance(payload, dict) or payload.get("run_id") != run_id:
        owner = payload.get("run_id") if isinstance(payload, dict) else None
        raise CheckpointError(f"checkpoint {source} belongs to run {owner!r}, not {run_id!r}; delete it.")
    return payload


def clear_checkpoint(checkpoint_dir: str | os.PathLike | None, run_id: str) -> None:
    if checkpoint_dir is not None:
        shutil.rmtree(Path(checkpoint_dir) / run_id, ignore_errors=True)


# ------------------------------------------------------------------------------ one run


def _error_text(e: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    head = f"{type(e).__name__}: {e}"
    tail = tb[-TRACEBACK_CHARS:]
    return f"{head}\n--- traceback (tail) ---\n{tail}"


def pretrained_root(checkpoint_dir, pretrained_dir) -> Path | None:
    """Where pretrained checkpoints live: `pretrained_dir`, else OUT/pretrained beside OUT/checkpoints."""
    if pretrained_dir is not None:
        return Path(pretrained_dir)
    return None if checkpoint_dir is None else Path(checkpoint_dir).parent / "pretrained"


def load_pretrained_into(model, config: dict, root: Path | None, device) -> str:
    """Start `model` from the run's pretrained checkpoint (computed first if missing); its key."""
    from nlbench.pretrain import ensure_pretrained, load_pretrained, pretrain_key

    if root is None:
        raise RuntimeError("this run names a pretrain block but no directory for pretrained checkpoints was given "
                           "(execute_run needs checkpoint_dir or pretrained_dir).")
    key = pretrain_key(config["model"], config["pretrain"])
    path, _ = ensure_pretrained(config["model"], config["pretrain"], root, device=device)
    load_pretrained(path, key, model)
    return key


def execute_run(spec: RunSpec, checkpoint_dir: str | os.PathLike | None = None, device: str | None = None,
                progress: Callable | None = None, threads: int | None = None,
                stop_after_task: int | None = None, pretrained_dir: str | os.PathLike | None = None,
                resume_from: bytes | None = None, on_checkpoint: Callable[[bytes], None] | None = None,
                ) -> "RunRecord":  # noqa: F821
    """Run one spec; never raises for a failing run (see module docstring).

    device: 'cpu', 'cuda', 'cuda:1', 'auto' or None (= the config's train.device).
    threads: torch CPU threads for this run (None leaves torch's setting).
    progress: called with nlbench.protocol.Progress(done, total, message) after every step.
    stop_after_task: stop after that task with status STOPPED, its checkpoint kept for the next
    call to resume from (tune's trials run task by task this way).
    pretrained_dir: pretrained checkpoints (default: checkpoint_dir's parent / "pretrained");
    a run whose config has a `pretrain` block starts from that checkpoint, computing it first
    if it is missing, and names its key in the `pretrain` column.
    resume_from / on_checkpoint: checkpoints kept by the caller instead of under checkpoint_dir
    (a Ray sweep's driver stores them, so a run resumes on any node): the bytes of the last
    one to resume from, and a callback given each new one's bytes after every task.
    """
    from nlbench.malloc import keep_freed_memory
    from nlbench.results import RunRecord, run_row

    config = spec.config
    t_wall = time.perf_counter()
    started_at = _now()
    prior_wall = 0.0
    keep_freed_memory()  # no page faults re-touching last step's activations (nlbench.malloc)
    if threads is not None:
        torch.set_num_threads(int(threads))
    run = run_row(
        run_id=spec.run_id, model=run_label(config), stream=config["stream"]["name"], seed=int(config["seed"]),
        protocol=config["protocol"], strategy=config["strategy"], status="failed",
        config=json.dumps(config, sort_keys=True), started_at=started_at, host=socket.gethostname(),
        versions=json.dumps(versions(), sort_keys=True), git_sha=git_sha(), size=config["model"]["size"],
    )
    matrix, curves = [], []
    ckpt = checkpoint_path(checkpoint_dir, spec.run_id) if checkpoint_dir is not None else None
    try:
        from nlbench.protocol import build_protocol

        dev = resolve_device(device, config)
        run["device"] = device_label(dev)
        seed_everything(int(config["seed"]))
        stream = build_run_stream(config)
        run["chance"] = json.dumps([float(t.chance) for t in stream.tasks])
        run["ceiling"] = json.dumps([None if t.ceiling is None else float(t.ceiling) for t in stream.tasks])
        model = build_run_model(config, stream.vocab_size).to(dev)
        run["params"] = int(model.num_params())
        # every model option after defaults and paper_exact, e.g. Hope's stabilisers
        run["model_options"] = json.dumps(getattr(model, "options", None), sort_keys=True)
        if config["protocol"] == "finetune":  # in_context trains no outer weight
            from nlbench.optim import routing_counts

            run["optimizer_params"] = json.dumps(routing_counts(config["train"]["optimizer"]["name"], model))
        if config.get("pretrain"):
            run["pretrain"] = load_pretrained_into(model, config, pretrained_root(checkpoint_dir, pretrained_dir), dev)
        protocol = build_protocol(config, model, stream, dev, progress=progress)

        if resume_from is not None:
            resume = checkpoint_from_bytes(resume_from, spec.run_id, "sent by the sweep's driver")
        else:
            resume = load_checkpoint(ckpt, spec.run_id) if ckpt is not None else None
        if resume is not None:
            prior_wall = float(resume["wall_s"])
            run["started_at"] = datetime.fromisoformat(resume["started_at"])

        def on_task_end(task_index: int, state: dict) -> None:
            payload = dict(run_id=spec.run_id, protocol_state=state, started_at=run["started_at"].isoformat(),
                           wall_s=prior_wall + time.perf_counter() - t_wall, after_task=task_index)
            if on_checkpoint is not None:
                on_checkpoint(checkpoint_to_bytes(payload))
            elif ckpt is not None:
                save_checkpoint(ckpt, payload)

        result = protocol.run(resume=None if resume is None else resume["protocol_state"],
                              on_task_end=on_task_end, stop_after_task=stop_after_task)
        matrix, curves = result.matrix, result.curves
        run["train_s"], run["eval_s"] = result.train_s, result.eval_s
        if result.train_s > 0:
            run["train_tokens_per_s"] = result.tokens_seen / result.train_s
        if result.status == "completed":
            run["status"] = "completed"
        elif result.status == "diverged":
            run["status"] = "diverged"
            run["error"] = f"diverged at step {result.diverged_step}: {result.error}"
        else:  # stop_after_task: not a failure; the checkpoint resumes it
            run["status"] = STOPPED
    except Exception as e:  # noqa: BLE001 - a failing run is a result, not a crash of the sweep
        run["status"], run["error"] = "failed", _error_text(e)
    run["finished_at"] = _now()
    run["wall_s"] = prior_wall + time.perf_counter() - t_wall
    if run["status"] in ("completed", "diverged"):
        clear_checkpoint(checkpoint_dir, spec.run_id)
    keys = dict(run_id=spec.run_id, model=run["model"], stream=run["stream"], seed=run["seed"])
    return RunRecord(run=run, matrix=[{**keys, **r} for r in matrix], curves=[{**keys, **r} for r in curves])


# ------------------------------------------------------------------------------ many runs


def run_sequential(specs: list[RunSpec], out_dir: str | os.PathLike, device: str | None = None,
                   threads: int | None = None, progress: Callable | None = None,
                   on_record: Callable | None = None) -> list:
    """Execute specs in this process, writing each record to ResultStore(out_dir).

    Run ids already completed in the store are skipped (idempotent re-runs); a failed or
    diverged run is run again. Checkpoints go to out_dir/checkpoints. `progress(spec, Progress)`
    sees every step, `on_record(spec, record)` every finished run. Returns the new records.
    """
    from nlbench.results import ResultStore

    from nlbench.storage import local_dir

    store = ResultStore(out_dir)
    ckpt_dir = Path(local_dir(out_dir, "checkpoints"))
    done = store.completed_run_ids()
    records = []
    for spec in specs:
        if spec.run_id in done:
            continue
        cb = None if progress is None else (lambda p, spec=spec: progress(spec, p))
        record = execute_run(spec, checkpoint_dir=ckpt_dir, device=device, progress=cb,
                             threads=threads)
        store.write_run(record)
        if record.run["status"] == "completed":
            done.add(spec.run_id)  # a spec listed twice runs once
        records.append(record)
        if on_record is not None:
            on_record(spec, record)
    with contextlib.suppress(OSError):
        ckpt_dir.rmdir()  # only when empty: every run finished
    return records


__all__ = ["STOPPED", "execute_run", "run_sequential", "sequential_threads", "resolve_device", "checkpoint_path", "clear_checkpoint"]
