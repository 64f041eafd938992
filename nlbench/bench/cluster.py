"""`nlbench bench CONFIG --address ADDR`: the throughput cases on every kind of node of a cluster.

A node's kind is what it computes on: ``GPU <type>`` for a node with GPUs (the type from the
``accelerator_type:<type>`` resource Ray gives GPU nodes; ``GPU`` when it has none) and ``CPU``
for a node without GPUs. One alive node of each kind (the first by node id) runs the whole
suite (nlbench.bench.suite) in a Ray task pinned to it (hard node affinity), all kinds at once;
the driver writes every row into one ``OUT/throughput``, so `nlbench report` shows the devices
side by side from one command. A kind that fails fails the command with nothing written.

The config's ``device`` picks the kinds: ``auto`` every kind, ``cpu`` the CPU kind (a GPU node's
CPUs when no node is CPU-only), ``cuda`` every GPU kind.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Kind", "node_kinds", "bench_on_cluster"]


@dataclass
class Kind:
    name: str  # "CPU", "GPU H100", ...
    node_id: str
    host: str
    device: str  # what the task computes on: "cpu" or "cuda"
    cpus: float  # the task's CPUs (its torch threads)
    gpus: float


def _gpu_type(resources: dict) -> str | None:
    types = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    return types[0] if types else None


def node_kinds(nodes: list[dict], device: str = "auto", threads: int | None = None) -> list[Kind]:
    """The kinds to measure among ``nodes`` (``ray.nodes()`` entries), one node each.

    ``threads``: the task's CPUs (the config's ``threads``; default all of the chosen node's)."""
    alive = sorted((n for n in nodes if n.get("Alive")), key=lambda n: n["NodeID"])
    found: dict[str, Kind] = {}

    def add(name, node, dev, gpus):
        cpus = node["Resources"].get("CPU", 0)
        # a CPU bench takes the node's CPUs (its matmul peak is the node's); a GPU one needs one
        task_cpus = min(float(threads or (cpus if dev == "cpu" else 1)), cpus)
        found.setdefault(name, Kind(name, node["NodeID"], node.get("NodeManagerHostname", "?"), dev,
                                    max(task_cpus, 1.0 if cpus >= 1 else cpus), gpus))

    for n in alive:
        res = n.get("Resources", {})
        if res.get("GPU", 0) >= 1 and device in ("auto", "cuda"):
            gtype = _gpu_type(res)
            add(f"GPU {gtype}" if gtype else "GPU", n, "cuda", 1)
        elif res.get("GPU", 0) < 1 and res.get("CPU", 0) > 0 and device in ("auto", "cpu"):
            add("CPU", n, "cpu", 0)
    if device == "cpu" and not found:  # only GPU nodes: measure the CPU of one of them
        for n in alive:
            if n.get("Resources", {}).get("CPU", 0) > 0:
                add("CPU", n, "cpu", 0)
                break
    return list(found.values())


def _measure_remote(cfg, models, kind: Kind, command: str, stamp: str, only: str | None) -> dict:
    """Body of the Ray task: the suite on this node's device, its printed lines collected."""
    import os

    import torch

    from nlbench.bench.suite import measure_suite

    if kind.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch on node {kind.node_id[:12]} ({kind.host}) sees no CUDA device although Ray "
                           f"lists GPUs there (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                           f"install a CUDA build of torch on it")
    if kind.device == "cpu":
        torch.set_num_threads(max(1, int(kind.cpus)))  # the CPUs Ray gave the task
    lines: list[str] = []
    out = measure_suite(cfg, models, kind.device, lines.append, command=command, stamp=stamp, only=only)
    out["lines"] = lines
    return out


def bench_on_cluster(cfg, models, address: str, log, *, command: str, stamp: str,
                     only: str | None = None) -> tuple[list[dict], list[str]]:
    """Measure on one node of each kind of the cluster at ``address``; returns (rows, errors).

    ``log`` gets each kind's choice of node and, as each kind finishes, the lines it printed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from nlbench.errors import UserError
    from nlbench.execution import connect

    started = connect(address)
    try:
        kinds = node_kinds(ray.nodes(), cfg.device, cfg.threads)
        if not kinds:
            raise UserError(f"the cluster at {address} has no alive node to measure device {cfg.device!r} on "
                            f"(a `device: cuda` bench needs a node with GPUs); nothing was measured or written.")
        task = ray.remote(_measure_remote)
        refs = {}
        for k in kinds:
            log(f"{k.name}: measuring on node {k.node_id} ({k.host}), {k.cpus:g} CPU(s), {k.gpus:g} GPU(s)")
            refs[task.options(num_cpus=k.cpus, num_gpus=k.gpus, max_retries=0,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(k.node_id, soft=False),
                              ).remote(cfg, models, k, command, stamp, only)] = k
        rows, errors = [], []
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            k = refs[done[0]]
            try:
                got = ray.get(done[0])
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
                errors.append(f"{k.name} on node {k.node_id} ({k.host}): {type(cause).__name__}: {first}")
                continue
            for line in [*got["lines"], *got["kernel_lines"]]:
                log(f"{k.name} | {line}")
            rows.extend(got["rows"])
        return rows, errors
    finally:
        if started:
            ray.shutdown()
