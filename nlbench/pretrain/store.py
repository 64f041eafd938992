"""Pretrained checkpoints on disk: one directory per content key, computed once, loaded safely.

    ROOT/<key>/model.pt        the finished checkpoint (written once, atomically)
    ROOT/<key>/progress.pt     the resumable state while training (removed when finished)
    ROOT/<key>/executions.log  one line per time the training actually started (pid, host, UTC)
    ROOT/<key>/failed.txt      why it diverged (a NaN is deterministic: later callers fail fast)
    ROOT/<key>/.lock           held while computing, so concurrent callers compute it once

`ensure_pretrained` returns the finished checkpoint, computing it first under the lock if it is
missing (and resuming from progress.pt if an earlier attempt died). Every file is read with
`torch.load(weights_only=True)`: a file holding anything but tensors and plain containers is
refused before any of it runs, and a file that is not an nlbench pretrained checkpoint for the
expected key and model is a `PretrainError` naming the file and the problem.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from nlbench.atomic import atomic_write
from nlbench.pretrain.config import pretrain_key

FORMAT = "nlbench-pretrained"
PROGRESS_FORMAT = "nlbench-pretrain-progress"
MODEL_FILE, PROGRESS_FILE, EXECUTIONS_FILE, LOCK_FILE = "model.pt", "progress.pt", "executions.log", ".lock"
FAILED_FILE = "failed.txt"


class PretrainError(RuntimeError):
    """A pretrained checkpoint that cannot be used (corrupt, foreign, for another model or key)."""


def checkpoint_dir(root, key: str) -> Path:
    return Path(root) / key


def save_atomic(path: Path, payload: dict) -> None:
    """torch.save, atomically (nlbench.atomic): never a torn file."""
    atomic_write(path, lambda f: torch.save(payload, f), private=True)


def read_safe(path: Path, fmt: str) -> dict:
    """torch.load(weights_only=True) with every failure turned into one clear PretrainError."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt zip, foreign pickle, refused global, …
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainError(
            f"pretrained checkpoint '{path}' cannot be read as tensors and plain data ({type(e).__name__}: {first}); "
            f"it is corrupt or was not written by nlbench. Nothing in it was executed. Delete it to recompute."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise PretrainError(f"'{path}' is not an nlbench pretrained checkpoint (format {got!r}, expected {fmt!r}); "
                            f"delete it to recompute.")
    return payload


def load_pretrained(path, key: str, model) -> dict:
    """Load the checkpoint at `path` into `model` (in place, strict) and return its metadata.
    Refuses a file written for another key or another model shape."""
    path = Path(path)
    payload = read_safe(path, FORMAT)
    if payload.get("key") != key:
        raise PretrainError(f"pretrained checkpoint '{path}' has key {payload.get('key')!r}, this run needs {key!r}; "
                            f"it belongs to another model or pretrain config.")
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise PretrainError(f"pretrained checkpoint '{path}' holds no state_dict.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PretrainError(f"pretrained checkpoint '{path}' does not fit this model "
                            f"(e.g. another vocabulary size): {str(e).splitlines()[0]} …") from None
    return {k: v for k, v in payload.items() if k != "state_dict"}


@contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def executions(root, key: str) -> int:
    """How many times the pretraining of `key` actually started training (resumes included)."""
    log = checkpoint_dir(root, key) / EXECUTIONS_FILE
    return len(log.read_text().splitlines()) if log.is_file() else 0


def build_model_for(model_entry: dict, block: dict, vocab_size: int):
    import random

    import numpy as np

    from nlbench.models import build_model

    seed = int(block["seed"])
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return build_model(model_entry["name"], size=model_entry["size"], vocab_size=vocab_size,
                       **(model_entry.get("options") or {}))


def ensure_pretrained(model_entry: dict, block: dict, root, device="cpu", progress=None,
                      stop_after_step: int | None = None) -> tuple[Path, bool]:
    """The finished checkpoint of (model, block) under `root`, computed first if missing.
    Returns (path, computed_now). Concurrent callers wait on the lock; only one trains.
    `progress(step, steps, losses)` sees every step; `stop_after_step` (test hook) stops early
    as a killed process would and returns the progress checkpoint's path."""
    from nlbench.pretrain.tasks import build_pretrain_stream
    from nlbench.pretrain.train import PretrainDiverged, pretrain

    key = pretrain_key(model_entry, block)
    d = checkpoint_dir(root, key)
    final = d / MODEL_FILE
    if final.is_file():
        return final, False
    with _locked(d):
        if final.is_file():
            return final, False
        failed = d / FAILED_FILE
        if failed.is_file():
            raise PretrainError(f"pretraining {key} diverged before ({failed.read_text().strip()}); it would again "
                                f"with the same config and seed: change them, or delete '{failed}' to try again.")
        device = torch.device(device)
        with open(d / EXECUTIONS_FILE, "a") as log:
            log.write(f"{datetime.now(timezone.utc).isoformat()} pid={os.getpid()} host={socket.gethostname()}\n")
        stream = build_pretrain_stream(block)
        model = build_model_for(model_entry, block, stream.vocab_size).to(device)
        progress_path = d / PROGRESS_FILE
        resume = None
        if progress_path.is_file():
            resume = read_safe(progress_path, PROGRESS_FORMAT)
            if resume.get("key") != key:
                raise PretrainError(f"'{progress_path}' belongs to key {resume.get('key')!r}, not {key!r}; delete it.")
        t0 = time.perf_counter()
        try:
            result = pretrain(model, block, stream, device, resume=resume, progress=progress,
                              on_checkpoint=lambda p: save_atomic(progress_path, dict(format=PROGRESS_FORMAT, key=key, **p)),
                              stop_after_step=stop_after_step)
        except PretrainDiverged as e:
            failed.write_text(f"{e}\n")
            raise PretrainError(f"pretraining {key} diverged: {e}; recorded in '{failed}'.") from None
        if result["steps_done"] < int(block["steps"]):  # test hook: stopped early, progress kept
            return progress_path, True
        save_atomic(final, dict(
            format=FORMAT, key=key, model=dict(model_entry), pretrain=dict(block), vocab_size=int(stream.vocab_size),
            state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
            history=result["history"], train_s=float(result["train_s"]), wall_s=time.perf_counter() - t0,
            finished_at=datetime.now(timezone.utc).isoformat(),
        ))
        try:
            progress_path.unlink()
        except FileNotFoundError:
            pass
        return final, True


__all__ = ["PretrainError", "checkpoint_dir", "ensure_pretrained", "executions", "load_pretrained", "read_safe",
           "save_atomic"]
