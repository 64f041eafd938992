"""Ray sweep execution: every run of a sweep on a Ray actor, embedded or on a real cluster.

``run_sweep(specs, out_dir)`` is what ``nlbench run`` calls (docs/ARCHITECTURE.md, "Runs").

* **Where.** ``address=None`` starts an embedded Ray runtime with this machine's CPUs (and GPUs,
  if any), the dashboard off, and shuts it down at the end; ``address="auto"``, ``"ray://h:10001"``
  or ``"host:port"`` joins an existing cluster. When the process already has a Ray runtime (a test
  session, a notebook, a Ray job's driver) it is used as it is.
* **What runs where.** A pool of :class:`RunActor` actors, each holding ``cpus_per_run`` CPUs
  and ``gpus_per_run`` GPUs (fractions allowed), as many as the cluster fits at once; each actor
  executes one run at a time with ``nlbench.runner.execute_run`` (torch threads = its CPUs, CUDA
  when it holds a GPU). Actors are reused across runs because starting a Python process and
  importing torch costs about a second, which would dwarf a short run.
* **Faults.** Per-task checkpoints go through the driver: ``RunActor.run`` is a streaming
  generator that yields the checkpoint's bytes after every task, and the driver stores them in
  ``OUT/checkpoints/<run_id>/last.pt`` (atomically) and sends them with the run whenever it
  (re)starts it, so a run resumes on any node, never from a path local to a lost one. When an
  actor's process or its whole node dies (``RayActorError``), the driver re-queues the run and
  sends it to a fresh actor on whatever nodes are alive (as many actors as they still hold), up
  to ``max_failures`` times; Ray itself restarts nothing (``max_restarts=0``), so nothing waits
  on an actor that cannot come back. A run whose actor dies more than ``max_failures`` times, or
  whose ``execute_run`` raises more than ``max_failures`` times, is recorded with status
  ``failed`` and the error, and the sweep goes on. A resumed run equals an undisturbed one.
* **One writer.** Results come back as runs finish (``ray.wait``) and only this driver writes them
  into ``OUT`` (``ResultStore.write_run``: one file per run per table, atomic), so nothing is
  written twice or half. Runs already ``completed`` in ``OUT`` are skipped: re-running a sweep
  after Ctrl-C, a killed driver or a lost cluster finishes only what is missing, and runs that
  were in flight resume from their checkpoints.

Only the driver touches ``OUT`` (results and checkpoints), so ``OUT`` needs to be reachable from
the driver only. Each ``runs`` row names the Ray node that ran it (``node_id``). Fractional
``gpus_per_run`` packs several actors per GPU; each actor computes on the GPU Ray assigned it
(Ray sets ``CUDA_VISIBLE_DEVICES`` per actor, so ``cuda`` is that GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

__all__ = ["RunActor", "SweepError", "run_sweep", "failed_record", "connect", "sweep_capacity"]


class SweepError(ValueError):
    """Bad arguments to :func:`run_sweep` (the message names the argument and what is allowed)."""


# ----------------------------------------------------------------------------- the actor


class RunActor:
    """Executes runs one at a time inside a Ray worker process.

    Wrapped with ``ray.remote`` in :func:`_actor_class` (so importing this module does not
    import Ray). ``num_cpus`` is the actor's CPU share: torch gets that many threads (at least
    one), because more threads than reserved cores only makes concurrent runs fight.
    """

    def __init__(self, num_cpus: float, use_gpu: bool):
        import torch

        self.threads = max(1, int(math.floor(num_cpus)))
        torch.set_num_threads(self.threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"

    def run(self, spec, resume_from: bytes | None, pretrained_dir: str, hooks: Mapping[str, Any] | None = None):
        """One run, as a Ray streaming generator: yields ``("checkpoint", bytes, None)`` after
        every task (the driver stores it, so any node can resume the run) and finally
        ``("record", RunRecord, info)``; ``info`` says which node, process and GPUs ran it.
        ``resume_from``: the bytes of the run's last checkpoint (None: from the start)."""
        import queue
        import threading

        import ray
        from nlbench.runner import execute_run

        ctx = ray.get_runtime_context()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ctx.get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": self.device}
        kwargs = dict(device=self.device, pretrained_dir=pretrained_dir, resume_from=resume_from)
        if hooks:  # extra execute_run arguments (e.g. its stop_after_task test hook)
            kwargs.update(hooks)
        items: queue.Queue = queue.Queue()

        def work():  # execute_run calls on_checkpoint from inside; the generator yields meanwhile
            try:
                record = execute_run(spec, threads=self.threads,
                                     on_checkpoint=lambda data: items.put(("checkpoint", data)), **kwargs)
                items.put(("record", record))
            except BaseException as e:  # noqa: BLE001 - re-raised in the generator below
                items.put(("error", e))

        threading.Thread(target=work, name=f"run-{spec.run_id}", daemon=True).start()
        while True:
            kind, value = items.get()
            if kind == "checkpoint":
                yield ("checkpoint", value, None)
            elif kind == "record":
                value.run["node_id"] = info["node_id"]
                yield ("record", value, info)
                return
            else:
                raise value

    def pid(self) -> int:
        return os.getpid()


_ACTOR_CLASS = None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(RunActor)
    return _ACTOR_CLASS


# ----------------------------------------------------------------------------- records


def failed_record(spec, error: str, started_at: float | None = None):
    """The ``runs`` row of a run that never returned a record (its actor kept dying, or
    ``execute_run`` raised): status ``failed`` with the error, no matrix or curves rows."""
    from nlbench.environment import git_sha, versions
    from nlbench.results import RunRecord, run_row

    now = time.time()
    started = now if started_at is None else started_at
    cfg = spec.config if isinstance(spec.config, dict) else {}
    model = cfg.get("model") or {}
    label = model.get("label") or model.get("name") or "?"
    run = run_row(
        run_id=spec.run_id,
        # read the config defensively: the run may have failed because the config is broken
        model=f"{label}@{cfg['variant']}" if cfg.get("variant") else label,
        stream=(cfg.get("stream") or {}).get("name") or "?",
        seed=int(cfg.get("seed", -1)),
        protocol=cfg.get("protocol") or "?",
        strategy=cfg.get("strategy") or "?",
        status="failed",
        error=error[-4000:],
        config=cfg,
        started_at=datetime.fromtimestamp(started, tz=timezone.utc),
        finished_at=datetime.fromtimestamp(now, tz=timezone.utc),
        wall_s=now - started,
        host=socket.gethostname(),
        versions=versions(),
        git_sha=git_sha(),
        size=model.get("size"),
    )
    return RunRecord(run=run, matrix=[], curves=[])


# ----------------------------------------------------------------------------- Ray runtime


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop a CPU sweep
        return 0


def _check_address(address):
    if address is None:
        return
    if not isinstance(address, str) or not address.strip():
        raise SweepError(
            f"address must be None (embedded Ray on this machine), 'auto', 'ray://HOST:PORT' or "
            f"'HOST:PORT' of a running cluster; got {address!r}."
        )
    if address.startswith(("http://", "https://")):
        raise SweepError(
            f"address {address!r} is a dashboard (Job Submission) URL; run_sweep joins a cluster with "
            f"'auto', 'ray://HOST:10001' or 'HOST:6379'. To send a sweep to a cluster's dashboard use "
            f"`nlbench submit CONFIG --address {address}`."
        )


# longest temp base that leaves room for "/nlbench-ray-XXXXXXXX/session_<date>_<pid>/sockets/plasma_store"
MAX_TEMP_BASE = 20


def embedded_temp_dir() -> str:
    """A fresh temp dir for the embedded runtime's sessions, sockets and logs (under RAY_TMPDIR
    when set and short enough for its socket paths, else /tmp): nothing shared with another Ray."""
    import tempfile

    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    # Ray's sockets live at <dir>/session_<date>_<pid>/sockets/<name> and a Unix socket path is
    # capped at 107 bytes: under a longer base Ray would fail to start, so use /tmp instead.
    if len(os.path.abspath(base)) > MAX_TEMP_BASE:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="nlbench-ray-", dir=base)


@contextlib.contextmanager
def _loopback_only():
    """Start Ray's processes bound to 127.0.0.1 instead of all interfaces.

    Ray binds loopback only in its local-only mode (chosen on macOS / Windows by
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). The driver reads that setting once at import, the
    processes it spawns read it from their environment: both are set while the runtime starts.
    """
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


def protect_auth_token() -> None:
    """Make Ray's token file private (0600): Ray writes it world-readable, and on a shared machine
    anyone who reads it can submit code to every runtime of this user."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if path.is_file() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError:  # a read-only home: nothing to tighten
        pass


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Make sure this process has a Ray runtime; return True when this call started it (and the
    caller should shut it down).

    ``address=None``: reuse a runtime this process already has, else start an embedded one of its
    own (``address="local"``, its own temp dir, every process bound to 127.0.0.1) with
    ``num_cpus`` (default: all of this machine's) and the local GPUs, dashboard off. Ray ≥ 2.59
    turns token authentication on for it (a token is made in ``~/.ray/auth_token``).
    Otherwise join the cluster at ``address`` ("auto", "ray://host:10001", "host:6379").
    """
    _check_address(address)
    import ray

    if ray.is_initialized():
        return False
    common = dict(log_to_driver=False, configure_logging=True, logging_level="WARNING")
    if address is None:
        with _loopback_only():
            ray.init(
                # "local": always a new runtime of our own; never RAY_ADDRESS, a `ray start` head on
                # this machine or a stale cluster-address file in Ray's temp dir
                address="local",
                num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
                num_gpus=num_gpus if num_gpus is not None else _local_gpus(),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                _temp_dir=embedded_temp_dir(),
                **common,
            )
        protect_auth_token()
        return True
    ray.init(address=address, **common)
    return True


def sweep_capacity(cpus_per_run: float, gpus_per_run: float) -> int:
    """How many runs the cluster holds at once with these per-run resources (0: not even one)."""
    import ray

    total = ray.cluster_resources()
    fits = []
    if cpus_per_run > 0:
        fits.append(math.floor(total.get("CPU", 0) / cpus_per_run + 1e-9))
    if gpus_per_run > 0:
        fits.append(math.floor(total.get("GPU", 0) / gpus_per_run + 1e-9))
    return max(0, min(fits) if fits else 1)


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A rich bar: done / running / failed and an ETA; silent when ``enabled`` is False."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if not enabled or total == 0:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
            TextColumn("running {task.fields[running]}  failed {task.fields[failed]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.task = self.bar.add_task("sweep", total=total, running=0, failed=0)
        self.bar.start()

    def update(self, done: int, running: int, failed: int):
        if self.bar is not None:
            self.bar.update(self.task, completed=done, running=running, failed=failed)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- the sweep


@dataclass
class _Slot:
    actor: Any
    spec: Any = None
    ref: Any = None  # the run in flight (a streaming generator)
    started: float = 0.0
    ready_ref: Any = None  # the actor's start-up (its pid() call) until it answers
    ready: bool | None = None  # the actor has started and takes runs


# how often (s) a sweep whose actors all wait for resources re-checks the live nodes
ACTOR_POLL_S = 10.0


@dataclass
class _Tally:
    completed: list = field(default_factory=list)
    diverged: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    restarts: dict = field(default_factory=dict)
    placements: dict = field(default_factory=dict)
    resumed: set = field(default_factory=set)


def _resources_from(resources, cpus_per_run, gpus_per_run, max_failures):
    """``resources=`` (a dict or the config's ResourcesConfig) overrides the keyword defaults."""
    if resources is None:
        return cpus_per_run, gpus_per_run, max_failures
    if hasattr(resources, "model_dump"):
        resources = resources.model_dump()
    if not isinstance(resources, Mapping):
        raise SweepError(
            f"resources must be a dict with cpus_per_run, gpus_per_run, max_failures (or the config's "
            f"`resources` section); got {type(resources).__name__}."
        )
    unknown = set(resources) - {"cpus_per_run", "gpus_per_run", "max_failures"}
    if unknown:
        raise SweepError(f"resources: unknown key(s) {sorted(unknown)}; allowed: cpus_per_run, gpus_per_run, max_failures.")
    return (
        resources.get("cpus_per_run", cpus_per_run),
        resources.get("gpus_per_run", gpus_per_run),
        resources.get("max_failures", max_failures),
    )


def _check_args(cpus_per_run, gpus_per_run, max_failures):
    if not isinstance(cpus_per_run, (int, float)) or isinstance(cpus_per_run, bool) or cpus_per_run < 0:
        raise SweepError(f"cpus_per_run must be a number >= 0 (fractions allowed, e.g. 0.5); got {cpus_per_run!r}.")
    if not isinstance(gpus_per_run, (int, float)) or isinstance(gpus_per_run, bool) or gpus_per_run < 0:
        raise SweepError(f"gpus_per_run must be a number >= 0 (fractions allowed, e.g. 0.25); got {gpus_per_run!r}.")
    if cpus_per_run == 0 and gpus_per_run == 0:
        raise SweepError("cpus_per_run and gpus_per_run are both 0; a run needs some CPU or GPU share.")
    if not isinstance(max_failures, int) or isinstance(max_failures, bool) or max_failures < 0:
        raise SweepError(f"max_failures must be an integer >= 0 (retries per run); got {max_failures!r}.")


def run_sweep(
    specs: Iterable,
    out_dir: str | os.PathLike,
    *,
    address: str | None = None,
    cpus_per_run: float = 1,
    gpus_per_run: float = 0,
    max_failures: int = 2,
    progress: bool = True,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: Mapping | Any | None = None,
    max_concurrent: int | None = None,
    on_record: Callable[[Any], None] | None = None,
    hooks: Mapping[str, Any] | None = None,
) -> dict:
    """Execute ``specs`` (RunSpecs) on Ray actors and write their results into ``out_dir``.

    Returns a summary dict: ``total``, ``skipped`` (already completed in OUT), ``completed``,
    ``diverged``, ``failed`` (counts), ``failed_runs`` (run_id -> error), ``restarts``
    (run_id -> actor restarts seen), ``wall_s``, ``concurrency``, ``out``.
    ``max_concurrent`` caps the number of actors (default: as many as the cluster fits);
    ``on_record`` is called with each record after it is written; ``hooks`` are extra keyword
    arguments for ``execute_run`` (testing).
    """
    t0 = time.perf_counter()
    cpus_per_run, gpus_per_run, max_failures = _resources_from(resources, cpus_per_run, gpus_per_run, max_failures)
    _check_args(cpus_per_run, gpus_per_run, max_failures)
    _check_address(address)
    from nlbench.results import ResultsError, ResultStore
    from nlbench.runner import clear_checkpoint

    from nlbench.storage import local_dir

    store = ResultStore(out_dir)
    out = store.out_dir
    specs = list({s.run_id: s for s in specs}.values())  # a run id twice would be one run
    done_before = store.completed_run_ids()
    pending = [s for s in specs if s.run_id not in done_before]
    tally = _Tally()
    summary = dict(total=len(specs), skipped=len(specs) - len(pending), out=str(out))
    if not pending:
        return _finish(summary, tally, t0, 0)

    import ray

    started_ray = connect(address, num_cpus=num_cpus, num_gpus=num_gpus)
    width = sweep_capacity(cpus_per_run, gpus_per_run)
    if width == 0:
        total = ray.cluster_resources()
        if started_ray:
            ray.shutdown()
        raise SweepError(
            f"no node can hold one run: cpus_per_run={cpus_per_run}, gpus_per_run={gpus_per_run}, but the "
            f"cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; lower the per-run "
            f"resources (config `resources:` section) or add nodes."
        )
    ckpt_dir = local_dir(out_dir, "checkpoints")  # only once the sweep can run: a refused one leaves nothing
    os.makedirs(ckpt_dir, exist_ok=True)
    try:  # pretrained checkpoints the runs name: each computed once, as a Ray task, before any actor holds CPUs
        from nlbench.pretrain.remote import pretrain_jobs, run_pretrain_jobs

        run_pretrain_jobs(pretrain_jobs(pending), Path(local_dir(out_dir, "pretrained")), cpus=cpus_per_run, gpus=gpus_per_run,
                          max_failures=max_failures)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    if max_concurrent is not None:
        width = max(1, min(width, int(max_concurrent)))
    width = min(width, len(pending))
    # Ray restarts nothing by itself: when an actor (or its node) dies, the driver re-sends the run
    # to a fresh actor wherever the cluster has room, with the run's last checkpoint
    Actor = _actor_class().options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_restarts=0, max_task_retries=0)

    def new_actor():
        return Actor.remote(cpus_per_run, gpus_per_run > 0)

    queue = list(reversed(pending))
    attempts: dict[str, int] = {}  # execute_run raised
    deaths: dict[str, int] = {}  # the actor running it died
    slots = [_Slot(new_actor()) for _ in range(width)]
    bar = _Progress(len(pending), progress)
    pretrained_dir = local_dir(out_dir, "pretrained")

    def submit(slot: _Slot):
        slot.spec = queue.pop()
        slot.started = time.time()
        resume = _read_checkpoint(ckpt_dir, slot.spec.run_id)
        if resume is not None:
            tally.resumed.add(slot.spec.run_id)
        slot.ref = slot.actor.run.options(num_returns="streaming").remote(slot.spec, resume, pretrained_dir, hooks)

    def record_of(slot: _Slot, spec, started):
        """Next item of the slot's run: store a checkpoint (None back), or the record, or the
        failed record / None (run re-queued) when the actor died or execute_run raised."""
        try:
            kind, value, info = ray.get(next(slot.ref))
        except StopIteration:  # cannot happen: the generator ends after the record
            return failed_record(spec, "the actor's run ended without a record", started), True
        except ray.exceptions.RayActorError as e:  # the process or its node is gone
            deaths[spec.run_id] = deaths.get(spec.run_id, 0) + 1
            tally.restarts[spec.run_id] = deaths[spec.run_id]
            if deaths[spec.run_id] <= max_failures:
                queue.append(spec)  # resumed next, from its last checkpoint, on a fresh actor
                return None, True
            return failed_record(spec, f"actor died {deaths[spec.run_id]} time(s) (max_failures={max_failures}): {e}",
                                 started), True
        except ray.exceptions.RayTaskError as e:
            attempts[spec.run_id] = attempts.get(spec.run_id, 0) + 1
            if attempts[spec.run_id] <= max_failures:
                queue.append(spec)  # retried next, on a fresh actor
                return None, True
            cause = e.cause if getattr(e, "cause", None) is not None else e
            text = "".join(traceback.format_exception_only(type(cause), cause)).strip()
            return failed_record(spec, f"execute_run raised {attempts[spec.run_id]} time(s): {text}\n{e}", started), True
        if kind == "checkpoint":
            _store_checkpoint(ckpt_dir, spec.run_id, value)
            return "checkpoint", False
        tally.placements[spec.run_id] = info
        return value, False

    def replenish():
        """Keep as many actors as the live nodes hold (at least one, at most ``width``): a lost
        node shrinks the sweep, a node that comes back (or joins) may grow it again."""
        want = max(1, min(_live_capacity(cpus_per_run, gpus_per_run), width))
        for s in slots:
            if s.actor is None and sum(x.actor is not None for x in slots) < want:
                s.actor, s.ready = new_actor(), None
                s.ready_ref = s.actor.pid.remote()

    def hand_out():
        # runs go only to actors that have started: one created while a node was dying may wait
        # for resources forever, and a run sent to it would wait with it
        for s in slots:
            if queue and s.actor is not None and s.ready and s.ref is None:
                submit(s)

    def drop(slot: _Slot):
        with contextlib.suppress(Exception):  # a dead actor may be gone already
            ray.kill(slot.actor, no_restart=True)
        slot.actor, slot.ready, slot.ready_ref = None, None, None

    try:
        for slot in slots:
            slot.ready_ref = slot.actor.pid.remote()
        while queue or any(s.ref is not None for s in slots):
            bar.update(len(tally.completed) + len(tally.diverged), sum(s.ref is not None for s in slots), len(tally.failed))
            busy = {s.ref: s for s in slots if s.ref is not None}
            starting = {s.ready_ref: s for s in slots if s.ready_ref is not None} if queue else {}
            # a timeout so a sweep left with no actor re-checks the cluster now and then
            ready, _ = ray.wait([*busy, *starting], num_returns=1, timeout=ACTOR_POLL_S)
            if not ready:
                replenish()
                continue
            for ref in ready:
                if ref in starting:  # an actor has started (or failed to: its node is gone)
                    slot = starting[ref]
                    slot.ready_ref = None
                    try:
                        ray.get(ref)
                        slot.ready = True
                    except ray.exceptions.RayError:
                        drop(slot)
                        replenish()
                    hand_out()
                    continue
                slot = busy[ref]
                spec, started = slot.spec, slot.started
                record, replace = record_of(slot, spec, started)
                if record == "checkpoint":
                    continue  # the run goes on
                slot.ref = slot.spec = None
                if replace:
                    drop(slot)
                    replenish()
                # hand the actors their next runs before writing this one's results, so the
                # driver's Parquet writes overlap the actors' work
                hand_out()
                if record is not None:
                    try:
                        store.write_run(record)
                    except ResultsError as e:  # a malformed record must not end the sweep
                        record = failed_record(spec, f"results of this run could not be stored: {e}", started)
                        store.write_run(record)
                    status = record.run.get("status")
                    if status in ("completed", "diverged"):
                        clear_checkpoint(ckpt_dir, spec.run_id)
                    if status == "completed":
                        tally.completed.append(spec.run_id)
                    elif status == "diverged":
                        tally.diverged.append(spec.run_id)
                    else:
                        tally.failed[spec.run_id] = record.run.get("error") or status
                    if on_record is not None:
                        on_record(record)
        bar.update(len(tally.completed) + len(tally.diverged), 0, len(tally.failed))
    finally:
        bar.close()
        for s in slots:
            try:
                if s.actor is not None:
                    ray.kill(s.actor, no_restart=True)
            except Exception:  # the runtime may already be gone (Ctrl-C during shutdown)
                pass
        if started_ray:
            ray.shutdown()
        with contextlib.suppress(OSError):
            os.rmdir(ckpt_dir)  # only when empty: every run finished
    return _finish(summary, tally, t0, width)


def _read_checkpoint(ckpt_dir: str, run_id: str) -> bytes | None:
    """The bytes of the run's last checkpoint stored by a driver (this one, or one killed before)."""
    from nlbench.runner import checkpoint_path

    try:
        return checkpoint_path(ckpt_dir, run_id).read_bytes()
    except FileNotFoundError:
        return None


def _store_checkpoint(ckpt_dir: str, run_id: str, data: bytes) -> None:
    from nlbench.runner import checkpoint_path, save_checkpoint

    save_checkpoint(checkpoint_path(ckpt_dir, run_id), data)


def _live_capacity(cpus_per_run: float, gpus_per_run: float) -> int:
    """Like sweep_capacity, from the nodes the GCS reports alive now (a lost node's resources can
    linger in the cluster totals for a moment)."""
    import ray

    total: dict = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for k, v in node.get("Resources", {}).items():
                total[k] = total.get(k, 0) + v
    fits = []
    if cpus_per_run > 0:
        fits.append(math.floor(total.get("CPU", 0) / cpus_per_run + 1e-9))
    if gpus_per_run > 0:
        fits.append(math.floor(total.get("GPU", 0) / gpus_per_run + 1e-9))
    return max(0, min(fits) if fits else 1)


def _finish(summary: dict, tally: _Tally, t0: float, width: int) -> dict:
    summary.update(
        completed=len(tally.completed),
        diverged=len(tally.diverged),
        failed=len(tally.failed),
        failed_runs=dict(tally.failed),
        restarts=dict(tally.restarts),
        placements=dict(tally.placements),
        resumed=sorted(tally.resumed),
        concurrency=width,
        wall_s=time.perf_counter() - t0,
    )
    return summary
