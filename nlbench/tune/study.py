"""The study: where Optuna keeps it (the single source of truth for resume), its sampler and
pruner, one tuner per study at a time, and which trials count toward `--trials`.

Default storage: an Optuna JournalStorage file `OUT/study.journal` (`optuna-dashboard
OUT/study.journal` opens it; safe for several processes on one file system); `--storage URL` takes
an RDB URL (`sqlite:///…`, `postgresql://…`) or another journal file. Trials a killed tuner left
RUNNING are marked FAIL with user attribute `fail_reason = "interrupted"`, not counted, and their
parameters re-enqueued (their runs resume from the interrupted trial's per-task checkpoints).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from nlbench.tune.config import TuneConfig, TuneConfigError

__all__ = ["INTERRUPTED", "JOURNAL_NAME", "finished_count", "is_rdb_url", "open_storage", "open_study", "make_pruner",
           "recover_interrupted", "tuner_lock"]

INTERRUPTED = "interrupted"
JOURNAL_NAME = "study.journal"


def is_rdb_url(url: str) -> bool:
    """An RDB URL (anything with '://' that is not 'journal:PATH'), else a journal file path."""
    return "://" in url and not url.startswith("journal:")


def open_storage(url: str):
    """A journal file path (or 'journal:PATH') -> JournalStorage; anything with '://' -> RDB URL."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if is_rdb_url(url):
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as e:  # noqa: BLE001 - unknown scheme, missing driver, unreachable server
            cause = " ".join(str(e).split())[:300] or type(e).__name__
            raise TuneConfigError(
                f"--storage {url!r} cannot be opened as an Optuna RDB storage ({type(e).__name__}: {cause}); give "
                f"sqlite:///PATH, postgresql://… or mysql://… with its driver installed, or a journal file path."
            ) from None
    path = url.removeprefix("journal:")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(path))


def make_pruner(tc: TuneConfig):
    import optuna

    if len(tc.objectives) > 1 or tc.study.pruner == "none":
        return optuna.pruners.NopPruner()
    if tc.study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.study.startup_trials, n_warmup_steps=0)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)


def _sampler(tc: TuneConfig, trials_so_far: int = 0):
    """The configured sampler. A resumed study seeds it with `seed + trials_so_far`: the same seed
    would restart the sampler's random stream and re-propose the first trials' values."""
    import optuna

    seed = None if tc.study.seed is None else tc.study.seed + trials_so_far
    if tc.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, tc.study.startup_trials),
                                      constant_liar=True)


def open_study(tc: TuneConfig, storage_url: str):
    """Create the study, or load it with a sampler seeded past the trials it already holds."""
    import optuna

    storage = open_storage(storage_url)
    study = optuna.create_study(
        study_name=tc.study_name, storage=storage, sampler=_sampler(tc), pruner=make_pruner(tc),
        directions=[o.direction for o in tc.objectives], load_if_exists=True,
    )
    so_far = len(study.get_trials(deepcopy=False))
    if so_far:
        study = optuna.load_study(study_name=tc.study_name, storage=storage, sampler=_sampler(tc, so_far),
                                  pruner=make_pruner(tc))
    return study


@contextlib.contextmanager
def tuner_lock(tc: TuneConfig, storage_url: str, out: Path):
    """Hold an exclusive lock for this study while tuning: a second tuner on the same study would
    mark the first one's running trials as interrupted and both would tell the same trials
    (Optuna's UpdateFinishedTrialError). The lock file sits next to a journal storage (else in
    OUT) and names the holder's host and pid; the OS releases it when the holder dies."""
    import fcntl
    import socket

    if not is_rdb_url(storage_url):
        journal = Path(storage_url.removeprefix("journal:")).absolute()
        path = journal.with_name(f"{journal.name}.{tc.study_name}.lock")
    else:
        path = out / f".{tc.study_name}.tune.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise TuneConfigError(
                f"study {tc.study_name!r} in {storage_url} is being tuned right now by {holder} (lock {path}); "
                f"wait for that tuner to finish (re-running then adds the missing trials), or use another "
                f"study.name or --out.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def recover_interrupted(study) -> list[int]:
    """Trials a killed tuner left RUNNING: mark FAIL (fail_reason 'interrupted'), re-enqueue their
    parameters; returns their numbers."""
    from optuna.trial import TrialState

    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", INTERRUPTED)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number})
        lost.append(t.number)
    return lost


def finished_count(study) -> int:
    """Trials that count toward --trials: complete, pruned, and failed for a reason of their own."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") != INTERRUPTED:
            n += 1
    return n
