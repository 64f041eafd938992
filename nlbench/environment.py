"""What a result records about where it was computed: package versions, the source commit, the
CPUs this process may use, and the device's name. One home for the runs table, failed records
and the throughput rows (torch is imported only by the device functions)."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

__all__ = ["available_cpus", "device_label", "device_name", "git_sha", "versions"]

PACKAGES = ("nlbench", "torch", "ray", "triton")


@lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """{"python": …, and each of PACKAGES: its installed version or None}."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The source checkout's commit, with '+dirty' for uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def device_label(dev) -> str:
    """A run's `device` column: "cuda:<GPU name>" or "cpu:<N>threads" (torch's threads)."""
    import torch

    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return f"cpu:{torch.get_num_threads()}threads"


def device_name(dev) -> str:
    """A throughput row's `device`: the GPU's name, or the CPU's architecture and torch's threads
    (a throughput figure is read per hardware, so the CPU model is part of it)."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"
