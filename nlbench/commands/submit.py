"""`nlbench submit` and `nlbench jobs`: send a sweep to a Ray cluster with the Job Submission API.

``nlbench submit CONFIG --address http://HEAD:8265 --out /shared/results`` uploads the working
directory (``--working-dir``, default the current one) as the job's ``runtime_env`` and starts
``nlbench run CONFIG --out OUT --address auto`` on the head node; that driver runs the sweep on
the cluster's actors (nlbench.execution) and writes OUT on the head. OUT should be an absolute
path on storage the head (and, for checkpoints, every node) sees: a relative OUT lands in the
job's temporary copy of the working directory. The cluster's Python environment must already
have nlbench's dependencies (and nlbench) installed; ``--pip SPEC`` (repeatable) adds pip
packages to the job's runtime_env instead.

Token authentication (Ray >= 2.59 turns it on for new local clusters; clusters started with
``RAY_AUTH_MODE=token``): the client needs the cluster's token, read by Ray from, in order,
the ``RAY_AUTH_TOKEN`` environment variable, the file named by ``RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token``; set ``RAY_AUTH_MODE=token`` on the submitting machine so the client sends
it (``Authorization: Bearer <token>``). Without it the dashboard answers 401/403 and this command
prints that error. ``ray get-auth-token --generate`` makes a token for a new cluster; copy it to
every node and every client. ``RAY_AUTH_MODE=disabled`` turns authentication off (not advised on
a network).

``nlbench jobs status JOB``, ``nlbench jobs logs JOB [--follow]``, ``nlbench jobs stop JOB`` and
``nlbench jobs list`` take the same ``--address`` (default: ``$RAY_API_SERVER_ADDRESS``, then
``$RAY_ADDRESS``).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import click

# never upload these: environments, results and caches can be gigabytes
UPLOAD_EXCLUDES = [
    ".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis",
    "results", "out", "runs", "*.parquet", "*.pt", "checkpoints", "node_modules",
]

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _default_address() -> str | None:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")


def _client(address: str | None):
    address = address or _default_address()
    if not address:
        raise click.UsageError(
            "no cluster address: pass --address http://HEAD:8265 (the head's dashboard), or set "
            "RAY_API_SERVER_ADDRESS."
        )
    if not address.startswith(("http://", "https://", "ray://")) and ":" not in address:
        raise click.BadParameter(
            f"{address!r} is not a cluster address; use http://HEAD:8265 (the head's dashboard port).",
            param_hint="--address",
        )
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, auth errors: one clear paragraph
        raise click.ClickException(
            f"cannot reach the Ray dashboard at {address}: {e}. Check the head is up "
            f"(`ray status` on it), the port is the dashboard's (8265 by default), and, with token "
            f"authentication, that RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, "
            f"RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) are set here."
        ) from None


def build_job(config: str, out: str, working_dir: str, pip: tuple[str, ...] = (), extra_args: tuple[str, ...] = ()):
    """The entrypoint and runtime_env of a sweep job (no network; testable on its own)."""
    wd = Path(working_dir).resolve()
    cfg = Path(config)
    cfg_abs = cfg.resolve()
    try:
        cfg_rel = cfg_abs.relative_to(wd)
    except ValueError:
        raise click.BadParameter(
            f"{config} is outside the working directory {wd} that is uploaded to the cluster; put the "
            f"config inside it or pass --working-dir to a folder that contains it.",
            param_hint="CONFIG",
        ) from None
    if not cfg_abs.is_file():
        raise click.BadParameter(f"config file {config} does not exist.", param_hint="CONFIG")
    args = ["nlbench", "run", cfg_rel.as_posix(), "--out", out, "--address", "auto", *extra_args]
    runtime_env = {"working_dir": str(wd), "excludes": list(UPLOAD_EXCLUDES)}
    if pip:
        runtime_env["pip"] = list(pip)
    return shlex.join(args), runtime_env


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--address", default=None, help="Ray dashboard URL of the cluster, e.g. http://HEAD:8265 "
              "(default $RAY_API_SERVER_ADDRESS).")
@click.option("--out", default="results", show_default=True,
              help="results directory ON THE HEAD NODE; use an absolute path on shared storage.")
@click.option("--working-dir", default=".", show_default=True, type=click.Path(file_okay=False, exists=True),
              help="folder uploaded as the job's working directory (must contain CONFIG).")
@click.option("--pip", "pip", multiple=True, help="pip requirement to install for the job (repeatable); "
              "default: use the cluster's environment as it is.")
@click.option("--job-id", default=None, help="submission id (default: Ray makes one).")
@click.option("--wait/--no-wait", default=False, help="follow the logs until the job ends; exit 1 unless it SUCCEEDED.")
def submit(config, address, out, working_dir, pip, job_id, wait):
    """Submit the sweep CONFIG to a Ray cluster (Job Submission API)."""
    if not os.path.isabs(out):
        click.echo(
            f"note: --out {out} is relative, so it is resolved in the job's temporary copy of the working "
            f"directory on the head; pass an absolute path to keep the results.", err=True,
        )
    entrypoint, runtime_env = build_job(config, out, working_dir, pip)
    from nlbench.config import expand_runs, load_config

    expand_runs(load_config(config))  # a bad config fails here, before anything is uploaded
    client = _client(address)
    job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
                            metadata={"nlbench_config": str(config)})
    addr = address or _default_address()
    click.echo(f"submitted job {job}")
    click.echo(f"  entrypoint: {entrypoint}")
    click.echo(f"  follow:     nlbench jobs logs {job} --follow --address {addr}")
    click.echo(f"  status:     nlbench jobs status {job} --address {addr}")
    click.echo(f"  stop:       nlbench jobs stop {job} --address {addr}")
    if wait:
        status = _follow(client, job)
        sys.exit(0 if status == "SUCCEEDED" else 1)


def _follow(client, job: str, poll_s: float = 1.0) -> str:
    """Print new log text until the job reaches a terminal status; return that status."""
    shown = 0
    while True:
        status = str(client.get_job_status(job))
        logs = client.get_job_logs(job)
        if len(logs) > shown:
            click.echo(logs[shown:], nl=False)
            shown = len(logs)
        if status in TERMINAL:
            click.echo(f"job {job}: {status}")
            return status
        time.sleep(poll_s)


address_option = click.option("--address", default=None, help="Ray dashboard URL, e.g. http://HEAD:8265.")


@click.group()
def jobs():
    """Status, logs and stopping of submitted sweeps."""


@jobs.command("status")
@click.argument("job")
@address_option
def status_cmd(job, address):
    """Print the job's status (PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED) and message."""
    info = _client(address).get_job_info(job)
    click.echo(f"{job}: {info.status}")
    if info.message:
        click.echo(info.message)


@jobs.command("logs")
@click.argument("job")
@address_option
@click.option("--follow", is_flag=True, help="keep printing until the job ends.")
def logs_cmd(job, address, follow):
    """Print the job's driver logs."""
    client = _client(address)
    if follow:
        _follow(client, job)
    else:
        click.echo(client.get_job_logs(job), nl=False)


@jobs.command("stop")
@click.argument("job")
@address_option
def stop_cmd(job, address):
    """Ask the cluster to stop the job (runs in flight resume from checkpoints next time)."""
    stopped = _client(address).stop_job(job)
    click.echo(f"{job}: {'stop requested' if stopped else 'already finished'}")


@jobs.command("list")
@address_option
def list_cmd(address):
    """List the cluster's jobs."""
    for info in _client(address).list_jobs():
        click.echo(f"{info.submission_id or info.job_id}\t{info.status}\t{info.entrypoint}")
