"""A sweep's pretrainings as Ray tasks, one per distinct checkpoint key, before its runs start.

`pretrain_jobs(specs)` lists the distinct (key, model entry, block) the specs name;
`run_pretrain_jobs(jobs, root, ...)` computes the missing ones concurrently as Ray tasks (each
with the runs' CPU / GPU share) and waits. A run then finds its checkpoint on disk; if a job
failed, the run that needs it retries it under the store's lock and records the error.
"""

from __future__ import annotations

import math
from pathlib import Path


def pretrain_jobs(specs) -> dict[str, tuple[dict, dict]]:
    from nlbench.pretrain.config import pretrain_key

    jobs = {}
    for spec in specs:
        block = spec.config.get("pretrain")
        if block:
            model = spec.config["model"]
            jobs.setdefault(pretrain_key(model, block), (model, block))
    return jobs


def _compute(model_entry: dict, block: dict, root: str, threads: int, use_gpu: bool) -> tuple[str, bool]:
    import torch

    from nlbench.pretrain.store import ensure_pretrained

    torch.set_num_threads(max(1, threads))
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    path, computed = ensure_pretrained(model_entry, block, root, device=device)
    return str(path), computed


def run_pretrain_jobs(jobs: dict, root, *, cpus: float = 1, gpus: float = 0, max_failures: int = 2) -> dict[str, str]:
    """Compute the missing checkpoints of `jobs` on the current Ray runtime; key -> error for
    the ones that failed (empty when all are on disk)."""
    import ray

    from nlbench.pretrain.store import MODEL_FILE, checkpoint_dir

    todo = {k: v for k, v in jobs.items() if not (checkpoint_dir(root, k) / MODEL_FILE).is_file()}
    if not todo:
        return {}
    task = ray.remote(_compute).options(num_cpus=cpus, num_gpus=gpus, max_retries=max_failures)
    refs = {k: task.remote(m, b, str(Path(root).absolute()), int(math.floor(cpus)), gpus > 0)
            for k, (m, b) in todo.items()}
    errors = {}
    for key, ref in refs.items():
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            errors[key] = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return errors


__all__ = ["pretrain_jobs", "run_pretrain_jobs"]
