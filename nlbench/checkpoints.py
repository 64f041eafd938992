"""Per-task checkpoints as bytes that load without running code.

A checkpoint (``nlbench.runner``: model, optimizer, strategy, fast state, RNG states, rows so far)
is read back with ``torch.load(weights_only=True)``, which accepts only tensors and plain
containers: a file planted in ``OUT/checkpoints`` (OUT may be shared storage) cannot execute
anything. :func:`encode` turns the few other values a checkpoint holds (numpy arrays and
scalars, datetimes) into tagged plain containers, and :func:`decode` turns them back; any other
object type is refused when the checkpoint is written, so a checkpoint that saves always loads.
"""

from __future__ import annotations

import io
import pickle
from datetime import datetime
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "encode", "decode", "to_bytes", "from_bytes"]

_TAG = "__nlbench__"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (the message names it and what to do)."""


def encode(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with numpy values and datetimes replaced by tagged dicts of tensors and strings."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device,
                                       torch.Size)):
        return obj
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        raw = torch.from_numpy(arr.reshape(-1).view(np.uint8).copy())
        return {_TAG: "ndarray", "dtype": arr.dtype.str, "shape": list(arr.shape), "data": raw}
    if isinstance(obj, np.generic):
        return {_TAG: "npscalar", "dtype": obj.dtype.str, "value": obj.item()}
    if isinstance(obj, datetime):
        return {_TAG: "datetime", "value": obj.isoformat()}
    if isinstance(obj, dict):
        if _TAG in obj:
            raise CheckpointError(f"{where}: a dict key {_TAG!r} is reserved for the checkpoint encoding.")
        return {k: encode(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(encode(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise CheckpointError(
        f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold tensors, numbers, "
        f"strings, numpy values, datetimes and dicts/lists/tuples of them (so they load with weights_only=True)."
    )


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, dict):
        tag = obj.get(_TAG)
        if tag == "ndarray":
            dtype = np.dtype(obj["dtype"])
            return obj["data"].numpy().view(dtype).reshape(obj["shape"]).copy()
        if tag == "npscalar":
            return np.dtype(obj["dtype"]).type(obj["value"])
        if tag == "datetime":
            return datetime.fromisoformat(obj["value"])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(decode(v) for v in obj)
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def to_bytes(payload: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(encode(payload), buf)
    return buf.getvalue()


def from_bytes(data: bytes, run_id: str, source: str) -> dict:
    """The checkpoint of ``run_id`` in ``data`` (read from ``source``, named in errors).

    Loaded with ``weights_only=True``: anything but tensors and plain containers is refused
    without being run. A checkpoint of another run is refused too."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        reason = next((line for line in first if "Unsupported" in line or "not an allowed" in line),
                      first[0] if first else type(e).__name__)
        raise CheckpointError(
            f"checkpoint {source} was refused: it is not a plain nlbench checkpoint (tensors and containers "
            f"only) and was not loaded ({reason.strip()[:300]}). Nothing in it was run. Delete it to start "
            f"run {run_id} over."
        ) from None
    if not isinstance(payload, dict) or payload.get("run_id") != run_id:
        owner = payload.get("run_id") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"checkpoint {source} belongs to run {owner!r}, not {run_id!r}; delete it to start run {run_id} over."
        )
    return decode(payload)
