"""The task loop both protocols share: evaluate at init, learn task 0, 1, …, evaluate after each
task and every `eval_every` training tokens, hand a snapshot to the caller after each task.

Rows it records (the runner adds run_id, model, stream, seed):
    matrix: after_task (−1 = init, the b row), eval_task, metric, value, tokens_seen
    curves: train_task, tokens_seen, eval_task, metric, value
`tokens_seen` counts the new-task training tokens consumed since the start of the run (B·T per
step; replayed sequences are not new tokens). A task's curve starts with the score measured
before its first step (A-GEM's Z_0, docs/METRICS.md), then one point every `eval_every` tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from nlbench.protocol.evaluate import Diverged

METRICS = ("accuracy", "loss")


@dataclass
class ProtocolResult:
    status: str                      # completed | diverged | stopped (test hook)
    matrix: list[dict]
    curves: list[dict]
    tokens_seen: int
    train_s: float
    eval_s: float
    error: str | None = None
    diverged_step: int | None = None
    tasks_done: int = 0


@dataclass
class Progress:
    """What a progress callback receives: steps done of the whole run, and a short message."""

    done: int
    total: int
    message: str


class Protocol:
    """Subclasses implement `train_task(i)`, `score(task) -> {metric: value}` and the extra
    checkpoint state of `extra_state` / `load_extra_state`."""

    name = "?"

    def __init__(self, config: dict, model, stream, device: torch.device, progress: Callable | None = None):
        self.config, self.model, self.stream, self.device = config, model, stream, device
        self.train_cfg, self.eval_cfg = config["train"], config["eval"]
        self.seed = int(config["seed"])
        self.dtype = self.train_cfg["dtype"]
        self.batch_size = int(self.train_cfg["batch_size"])
        self.seq_len = int(stream.seq_len)
        self.steps_per_task = max(1, int(self.train_cfg["tokens_per_task"]) // (self.batch_size * self.seq_len))
        self.eval_every = self.train_cfg.get("eval_every")
        self.progress = progress
        self.matrix: list[dict] = []
        self.curves: list[dict] = []
        self.tokens_seen = 0
        self.step = 0                      # training steps since the start of the run
        self.train_s = 0.0
        self.eval_s = 0.0
        self.last_scores: dict[int, dict[str, float]] = {}
        self._eval_cache: dict[int, tuple] = {}

    # ------------------------------------------------------------------ subclass hooks
    def train_task(self, i: int) -> None:
        raise NotImplementedError

    def score(self, task) -> dict[str, float]:
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ evaluation
    def eval_set(self, task):
        if task.index not in self._eval_cache:
            self._eval_cache[task.index] = task.eval_set()
        return self._eval_cache[task.index]

    def evaluate_tasks(self, tasks) -> dict[int, dict[str, float]]:
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            scores = {task.index: self.score(task) for task in tasks}
        finally:
            self.model.train(was_training)
        self._sync()
        self.eval_s += time.perf_counter() - t0
        return scores

    def record_matrix(self, after_task: int, scores: dict) -> None:
        for j, s in sorted(scores.items()):
            for metric in METRICS:
                self.matrix.append(dict(after_task=after_task, eval_task=j, metric=metric,
                                        value=float(s[metric]), tokens_seen=self.tokens_seen))
        self.last_scores.update(scores)

    def record_curve(self, train_task: int, scores: dict) -> None:
        for j, s in sorted(scores.items()):
            for metric in METRICS:
                self.curves.append(dict(train_task=train_task, tokens_seen=self.tokens_seen, eval_task=j,
                                        metric=metric, value=float(s[metric])))

    def curve_tasks(self, i: int):
        if self.eval_cfg.get("curve_tasks", "all") == "current":
            return [self.stream.tasks[i]]
        return list(self.stream.tasks)

    def after_step(self, i: int, step_in_task: int) -> None:
        """Called by train_task after every step: curve points on the eval_every cadence (the
        one that falls on the task's last step is taken from the end-of-task evaluation)."""
        self.step += 1
        prev = self.tokens_seen
        self.tokens_seen += self.batch_size * self.seq_len
        if self.progress is not None:
            total = self.steps_per_task * len(self.stream.tasks)
            self.progress(Progress(self.step, total, f"task {i + 1}/{len(self.stream.tasks)}"))
        if not self.eval_every:
            return
        start = self.task_start_tokens
        if (self.tokens_seen - start) // self.eval_every > (prev - start) // self.eval_every:
            if step_in_task == self.steps_per_task - 1:
                self.curve_point_at_end = True
            else:
                self.record_curve(i, self.evaluate_tasks(self.curve_tasks(i)))

    # ------------------------------------------------------------------ the loop
    def run(self, resume: dict | None = None, on_task_end: Callable | None = None,
            stop_after_task: int | None = None) -> ProtocolResult:
        tasks = self.stream.tasks
        if resume is not None:
            self.load_state(resume)
            start = int(resume["next_task"])
        else:
            self.record_matrix(-1, self.evaluate_tasks(tasks))
            start = 0
        for i in range(start, len(tasks)):
            if self.eval_every:
                wanted = {t.index for t in self.curve_tasks(i)}
                self.record_curve(i, {j: s for j, s in self.last_scores.items() if j in wanted})
            self.task_start_tokens, self.curve_point_at_end = self.tokens_seen, False
            t0, eval_before = time.perf_counter(), self.eval_s
            try:
                self.train_task(i)
            except Diverged as d:
                self._add_train_time(t0, eval_before)
                return self.result("diverged", error=d.reason, diverged_step=d.step, tasks_done=i)
            self._add_train_time(t0, eval_before)
            scores = self.evaluate_tasks(tasks)
            self.record_matrix(i, scores)
            if self.curve_point_at_end:
                wanted = {t.index for t in self.curve_tasks(i)}
                self.record_curve(i, {j: s for j, s in scores.items() if j in wanted})
            if on_task_end is not None:
                on_task_end(i, self.state_dict(next_task=i + 1))
            if stop_after_task is not None and i >= stop_after_task and i < len(tasks) - 1:
                return self.result("stopped", tasks_done=i + 1)
        return self.result("completed", tasks_done=len(tasks))

    def result(self, status: str, **kw) -> ProtocolResult:
        return ProtocolResult(status=status, matrix=list(self.matrix), curves=list(self.curves),
                              tokens_seen=self.tokens_seen, train_s=self.train_s, eval_s=self.eval_s, **kw)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, next_task: int) -> dict:
        """Everything needed to continue after task `next_task − 1` exactly as if never stopped."""
        return dict(
            protocol=self.name, next_task=next_task, model=self.model.state_dict(),
            matrix=list(self.matrix), curves=list(self.curves), tokens_seen=self.tokens_seen,
            step=self.step, train_s=self.train_s, eval_s=self.eval_s,
            last_scores={int(k): dict(v) for k, v in self.last_scores.items()},
            rng=rng_state(), extra=self.extra_state(),
        )

    def load_state(self, state: dict) -> None:
        if state.get("protocol") != self.name:
            raise ValueError(f"checkpoint was written by protocol {state.get('protocol')!r}, this run is {self.name!r}.")
        self.model.load_state_dict(state["model"])
        self.matrix, self.curves = list(state["matrix"]), list(state["curves"])
        self.tokens_seen, self.step = int(state["tokens_seen"]), int(state["step"])
        self.train_s, self.eval_s = float(state["train_s"]), float(state["eval_s"])
        self.last_scores = {int(k): dict(v) for k, v in state["last_scores"].items()}
        self.load_extra_state(state["extra"])
        set_rng_state(state["rng"])

    def _add_train_time(self, t0: float, eval_before: float) -> None:
        # curve evaluations inside train_task are eval time, not training time
        self._sync()
        self.train_s += time.perf_counter() - t0 - (self.eval_s - eval_before)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def rng_state() -> dict:
    import random

    import numpy as np

    # numpy's legacy state as plain data (name, keys as a tensor, pos, has_gauss, gauss), so a
    # checkpoint loads with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    out = dict(torch=torch.get_rng_state(), python=random.getstate(),
               numpy=(name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["METRICS", "Progress", "Protocol", "ProtocolResult", "Diverged", "rng_state", "set_rng_state"]
