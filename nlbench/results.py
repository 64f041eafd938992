"""Parquet results store (docs/ARCHITECTURE.md, "Results store").

``OUT/<table>/`` is a Parquet dataset that ``pandas.read_parquet(OUT / "runs")`` reads whole. OUT
is a directory or an object-store prefix (``s3://…``, ``gs://…``; :mod:`nlbench.storage`). Each
run writes one file per table, named by its run id; bench/tune write one file per key. Every file
is written whole through :mod:`nlbench.storage` (local: hidden temp file, fsync, ``os.replace``;
object stores: one upload), so a reader sees the old file or the new one, never half of one, and
a re-written run never has two rows. Every file carries ``nlbench.schema_version`` and ``nlbench.table`` in its Arrow schema
metadata; :meth:`ResultStore.read` refuses files from a newer version and corrupt files with a
:class:`ResultsError` that names the file.

Order of :meth:`ResultStore.write_run`: ``matrix``, ``curves``, then ``runs``; a run's ``runs`` row
is therefore its commit marker; :meth:`ResultStore.check_runs` also checks that a completed run's
``matrix`` and ``curves`` files are there and readable, and a run whose files were deleted or
corrupted counts as incomplete, so the next sweep recomputes it.

``trials`` has a fixed part plus one column per searched parameter, named ``param_<name>`` (and
``attr_<name>`` for Optuna user attributes); their types are inferred per file (bool, int64,
float64, else string) and unified across files on read. ``pandas.read_parquet(OUT / "trials")``
takes the schema of one file, so it may drop parameters only other studies have; use ``read``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "CorruptFileError", "DYNAMIC_PREFIXES", "SCHEMA_VERSION", "SCHEMA_VERSION_KEY", "TABLES", "TABLE_KEY", "Column",
    "ResultStore", "ResultsError", "RunRecord", "RunRow", "canonical_json", "run_id_for", "run_row", "schema_for",
]

SCHEMA_VERSION = 9
# columns added after schema v1, with the version that added them: files written before it read
# with the column null (a v1 throughput file has no compile_mode)
ADDED_IN: dict[tuple[str, str], int] = {("throughput", "compile_mode"): 2, ("runs", "pretrain"): 3,
                                   ("runs", "model_options"): 4, ("runs", "optimizer_params"): 5,
                                   ("runs", "ceiling"): 6, ("runs", "node_id"): 7, ("throughput", "token_ms_p50"): 8,
                                   ("throughput", "token_ms_p95"): 8, ("throughput", "token_ms_mean"): 8,
                                   ("throughput", "stream_chunk"): 8,
                                   ("throughput", "ray_version"): 9, ("throughput", "git_sha"): 9}
SCHEMA_VERSION_KEY = "nlbench.schema_version"
TABLE_KEY = "nlbench.table"
RUN_STATUSES = ("completed", "failed", "diverged")
SCORE_METRICS = ("accuracy", "loss", "perplexity")
TRIAL_STATES = ("complete", "pruned", "fail", "running", "waiting")
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,199}")
_DYNAMIC_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")


class ResultsError(ValueError):
    """Bad rows on write, or an unreadable / incompatible file on read (the message names it)."""


class CorruptFileError(ResultsError):
    """A results file that is not readable Parquet (truncated, overwritten): the run that wrote it
    is recomputed by the next sweep (:meth:`ResultStore.check_runs`)."""


@dataclass(frozen=True)
class Column:
    """One column of a table. ``kind``: str, int, float, bool, ts (UTC timestamp) or json (JSON text)."""

    name: str
    kind: str
    required: bool = False
    allowed: tuple[str, ...] | None = None

    @property
    def type(self) -> pa.DataType:
        return _ARROW_TYPES[self.kind]


_ARROW_TYPES = {
    "str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
    "ts": pa.timestamp("us", tz="UTC"), "json": pa.string(),
}


def _cols(spec: str, required: set[str] = frozenset(), allowed: Mapping[str, tuple] = {}) -> tuple[Column, ...]:
    out = []
    for item in spec.split():
        name, kind = item.split(":")
        out.append(Column(name, kind, name in required, allowed.get(name)))
    return tuple(out)


TABLES: dict[str, tuple[Column, ...]] = {
    "runs": _cols(
        "run_id:str model:str stream:str seed:int protocol:str strategy:str status:str error:str config:json "
        "started_at:ts finished_at:ts wall_s:float train_s:float eval_s:float device:str host:str params:int "
        "versions:json git_sha:str size:str chance:json train_tokens_per_s:float pretrain:str model_options:json optimizer_params:json ceiling:json node_id:str",
        required={"run_id", "model", "stream", "seed", "protocol", "strategy", "status", "config"},
        allowed={"status": RUN_STATUSES},
    ),
    "matrix": _cols(
        "run_id:str model:str stream:str seed:int after_task:int eval_task:int metric:str value:float tokens_seen:int",
        required={"run_id", "model", "stream", "seed", "after_task", "eval_task", "metric"},
        allowed={"metric": SCORE_METRICS},
    ),
    "curves": _cols(
        "run_id:str model:str stream:str seed:int train_task:int tokens_seen:int eval_task:int metric:str value:float",
        required={"run_id", "model", "stream", "seed", "train_task", "tokens_seen", "eval_task", "metric"},
        allowed={"metric": SCORE_METRICS},
    ),
    "throughput": _cols(
        "run_id:str model:str size:str seq_len:int batch_size:int phase:str tokens_per_s:float step_ms_p50:float "
        "step_ms_p95:float peak_mem_bytes:int mfu:float mfu_datasheet:float flops_per_token:float device:str "
        "dtype:str torch_version:str triton_version:str command:str compile_s:float timestamp:ts "
        "params:int steps:int nlbench_version:str python_version:str matmul_peak_flops:float config_name:str "
        "compile_mode:str token_ms_p50:float token_ms_p95:float token_ms_mean:float stream_chunk:int ray_version:str "
        "git_sha:str",
        required={"run_id", "model", "size", "seq_len", "batch_size", "phase", "tokens_per_s", "device", "dtype"},
        allowed={"phase": ("train", "infer", "stream")},
    ),
    # fixed part; plus param_<name> / attr_<name> columns (DYNAMIC_PREFIXES)
    "trials": _cols(
        "study:str trial:int model:str stream:str state:str objective:str direction:str value:float "
        "run_ids:json params:json seeds:int started_at:ts finished_at:ts duration_s:float timestamp:ts",
        required={"study", "trial", "state"},
        allowed={"state": TRIAL_STATES, "direction": ("minimize", "maximize")},
    ),
}
DYNAMIC_PREFIXES: dict[str, tuple[str, ...]] = {"trials": ("param_", "attr_")}


def schema_for(table: str, dynamic: Sequence[pa.Field] = ()) -> pa.Schema:
    """The Arrow schema of ``table`` (fixed columns, then ``dynamic``), with the version metadata."""
    _check_table(table)
    fields = [pa.field(c.name, c.type, nullable=not c.required) for c in TABLES[table]]
    return pa.schema([*fields, *dynamic], metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION), TABLE_KEY: table})


def _check_table(table: str):
    if table not in TABLES:
        raise ResultsError(f"unknown results table {table!r}; the tables are {sorted(TABLES)}.")


# ----------------------------------------------------------------------------- run ids


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, datetime):
        return o.isoformat()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "model_dump"):  # pydantic models
        return o.model_dump(mode="json")
    raise TypeError(f"cannot encode {type(o).__name__} value {o!r} as JSON (configs hold str, numbers, bools, lists, dicts)")


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal configs give equal text (``1`` and ``1.0`` differ)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def run_id_for(config: Mapping[str, Any], length: int = 16) -> str:
    """Content id of a run: the first ``length`` hex digits of sha256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()[:length]


# ----------------------------------------------------------------------------- rows -> Arrow


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _to_ts(v) -> datetime:
    if isinstance(v, np.datetime64):
        import pandas as pd

        v = pd.Timestamp(v).to_pydatetime()
    if isinstance(v, str):
        v = datetime.fromisoformat(v)
    elif _is_number(v) and math.isfinite(v):
        v = datetime.fromtimestamp(float(v), tz=timezone.utc)
    if not isinstance(v, datetime):
        raise TypeError
    return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)


def _to_json(v) -> str:
    if isinstance(v, str):
        json.loads(v)  # must already be JSON text
        return v
    return canonical_json(v)


_EXPECTED = {
    "str": "a string", "int": "an integer", "float": "a number", "bool": "a bool",
    "ts": "a datetime, ISO-8601 string or epoch seconds", "json": "a JSON-encodable value or JSON text",
}


def _convert(kind: str, v):
    """One cell to the Python value Arrow stores; raises TypeError/ValueError when it does not fit."""
    if kind == "str":
        if not isinstance(v, str):
            raise TypeError
        return str(v)
    if kind == "int":
        if _is_int(v):
            return int(v)
        if _is_number(v) and math.isfinite(v) and float(v).is_integer():  # 3.0 is fine, 3.5 is not
            return int(v)
        raise TypeError
    if kind == "float":
        if not _is_number(v):
            raise TypeError
        return float(v)
    if kind == "bool":
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError
        return bool(v)
    if kind == "ts":
        return _to_ts(v)
    if kind == "json":
        return _to_json(v)
    raise AssertionError(kind)


# Exact Python types Arrow converts without loss: columns made only of these skip the per-cell checks.
_FAST_TYPES = {"str": {str}, "int": {int}, "float": {float, int}, "bool": {bool}}


def _column(table: str, name: str, kind: str, values: list, required: bool = False, allowed=None) -> pa.Array:
    fast = _FAST_TYPES.get(kind)
    if fast is not None:
        types = set(map(type, values))
        if types <= (fast if required else fast | {type(None)}) and (allowed is None or set(values) <= {*allowed, None}):
            return pa.array(values, type=_ARROW_TYPES[kind])
    out = []
    for i, v in enumerate(values):
        if v is None or (kind != "float" and isinstance(v, float) and math.isnan(v)):
            if required:
                raise ResultsError(f"{table}.{name} is required but row {i} has no value; give every row a {name}.")
            out.append(None)
            continue
        try:
            cell = _convert(kind, v)
        except (TypeError, ValueError, OverflowError):
            raise ResultsError(
                f"{table}.{name}: row {i} holds {v!r} ({type(v).__name__}); expected {_EXPECTED[kind]}."
            ) from None
        if allowed is not None and cell not in allowed:
            raise ResultsError(f"{table}.{name}: row {i} holds {cell!r}; allowed values are {list(allowed)}.")
        out.append(cell)
    return pa.array(out, type=_ARROW_TYPES[kind])


def _dynamic_column(table: str, name: str, values: list) -> tuple[pa.Field, pa.Array]:
    """A searched parameter: the narrowest of bool / int64 / float64 that holds every value, else string."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        kind = "bool"
    elif all(_is_int(v) for v in present):
        kind = "int" if present else "float"
    elif all(_is_number(v) for v in present):
        kind = "float"
    else:  # categorical choices of mixed types: keep them all, as text
        kind = "str"
        values = [None if v is None else v if isinstance(v, str) else canonical_json(v) for v in values]
    return pa.field(name, _ARROW_TYPES[kind]), _column(table, name, kind, values)


def _to_arrow(table: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    _check_table(table)
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ResultsError(f"{table}: row {i} is a {type(r).__name__}; rows are dicts of column -> value.")
    cols = TABLES[table]
    known = {c.name for c in cols}
    prefixes = DYNAMIC_PREFIXES.get(table, ())
    extra = sorted({k for r in rows for k in r} - known)
    bad = [k for k in extra if not (k.startswith(prefixes) and _DYNAMIC_NAME_RE.fullmatch(k))] if prefixes else extra
    if bad:
        dyn = f", plus columns named {' / '.join(p + '<name>' for p in prefixes)}" if prefixes else ""
        raise ResultsError(f"{table}: unknown column(s) {bad}; the columns are {[c.name for c in cols]}{dyn}.")
    arrays = [_column(table, c.name, c.kind, [r.get(c.name) for r in rows], c.required, c.allowed) for c in cols]
    dynamic = []
    for name in extra:
        f, a = _dynamic_column(table, name, [r.get(name) for r in rows])
        dynamic.append(f)
        arrays.append(a)
    return pa.Table.from_arrays(arrays, schema=schema_for(table, dynamic))


# ----------------------------------------------------------------------------- files


def _parquet_bytes(data: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(data, sink)
    return sink.getvalue().to_pybytes()


class RunRow(TypedDict):
    """One row of the ``runs`` table (columns in ``TABLES["runs"]``; a test keeps the two equal).
    json columns take the JSON text or the value itself. Build one with :func:`run_row`."""

    run_id: str
    model: str
    stream: str
    seed: int
    protocol: str
    strategy: str
    status: str                    # completed | failed | diverged (runner.STOPPED: never written)
    error: str | None
    config: Any
    started_at: datetime | None
    finished_at: datetime | None
    wall_s: float | None
    train_s: float | None
    eval_s: float | None
    device: str | None
    host: str | None
    params: int | None
    versions: Any
    git_sha: str | None
    size: str | None
    chance: Any
    train_tokens_per_s: float | None
    pretrain: str | None
    model_options: Any
    optimizer_params: Any
    ceiling: Any
    node_id: str | None            # the Ray node that ran it (set by the sweep's actor)


def run_row(**fields: Any) -> RunRow:
    """A ``runs`` row with every column: the given fields, None elsewhere (unknown names refused)."""
    unknown = set(fields) - set(RunRow.__annotations__)
    if unknown:
        raise ResultsError(f"run_row: unknown runs column(s) {sorted(unknown)}.")
    return RunRow(**{name: fields.get(name) for name in RunRow.__annotations__})


@dataclass
class RunRecord:
    """What one run produces: its ``runs`` row, ``matrix`` rows and ``curves`` rows."""

    run: RunRow
    matrix: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)


class ResultStore:
    """``OUT/<table>/<key>.parquet`` files; see the module docstring for the guarantees."""

    def __init__(self, out_dir: str | os.PathLike):
        from nlbench.storage import location

        self.location = location(out_dir)
        # a Path for a local OUT (as before), else the URI as given
        self.out_dir = Path(self.location.root) if self.location.local else self.location.uri

    def _name(self, table: str, key: str) -> str:
        _check_table(table)
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ResultsError(
                f"results file key {key!r} is not usable as a file name: it must be 1-200 characters of "
                f"letters, digits and . _ + @ -, starting with a letter or digit."
            )
        return f"{table}/{key}.parquet"

    def path(self, table: str, key: str) -> Path | str:
        """Where ``OUT/<table>/<key>.parquet`` is: a Path for a local OUT, else its URI."""
        name = self._name(table, key)
        return Path(self.location.join(name)) if self.location.local else self.location.display(name)

    def _write(self, name: str, data: pa.Table):
        from nlbench.storage import StorageError

        try:
            self.location.write(name, _parquet_bytes(data))
        except StorageError as e:
            raise ResultsError(str(e)) from e

    def write_rows(self, table: str, rows: Sequence[Mapping[str, Any]], key: str) -> Path:
        """Replace ``OUT/<table>/<key>.parquet`` with ``rows`` (atomic; same key twice -> one file)."""
        data = _to_arrow(table, list(rows))
        self._write(self._name(table, key), data)
        return self.path(table, key)

    def write_run(self, record: RunRecord) -> None:
        """Write a run's matrix, curves, then runs row, each replacing that run's previous file.

        ``run_id``, ``model``, ``stream`` and ``seed`` missing from matrix/curves rows are taken
        from ``record.run``; a row that disagrees with it is an error.
        """
        run = dict(record.run)
        run_id = run.get("run_id")
        if not isinstance(run_id, str):
            raise ResultsError(f"runs.run_id is required and must be a string (see run_id_for); got {run_id!r}.")
        name = self._name("runs", run_id)
        tables = {}
        for table, rows in (("matrix", record.matrix), ("curves", record.curves)):
            filled = []
            for i, r in enumerate(rows):
                r = dict(r)
                for k in ("run_id", "model", "stream", "seed"):
                    if r.get(k) is None:
                        r[k] = run.get(k)
                    elif r[k] != run.get(k):
                        raise ResultsError(
                            f"{table} row {i} has {k}={r[k]!r} but the run has {k}={run.get(k)!r}; "
                            f"a record holds the rows of one run."
                        )
                filled.append(r)
            tables[table] = _to_arrow(table, filled)
        runs = _to_arrow("runs", [run])  # validate everything before the first file changes
        for table, data in tables.items():
            self._write(self._name(table, run_id), data)
        self._write(name, runs)

    def _file_names(self, table: str) -> list[str]:
        _check_table(table)
        from nlbench.storage import StorageError

        try:
            names = self.location.list(table)
        except StorageError as e:
            raise ResultsError(str(e)) from e
        return [f"{table}/{n}" for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))]

    def files(self, table: str) -> list[Path | str]:
        """The table's data files (Paths for a local OUT, else URIs), hidden temp files and other names excluded."""
        names = self._file_names(table)
        if self.location.local:
            return [Path(self.location.join(n)) for n in names]
        return [self.location.display(n) for n in names]

    def _read_file(self, table: str, name: str) -> pa.Table:
        path = self.location.display(name)
        try:
            blob = pa.BufferReader(self.location.read(name))
            meta = pq.read_schema(blob).metadata or {}
        except (OSError, ValueError, pa.ArrowException) as e:
            raise CorruptFileError(
                f"results file {path} is corrupt, not Parquet or unreadable ({e}); re-run what wrote it "
                f"(`nlbench run` recomputes the run)."
            ) from e
        raw_version = meta.get(SCHEMA_VERSION_KEY.encode())
        if raw_version is None:
            raise ResultsError(f"results file {path} has no {SCHEMA_VERSION_KEY} metadata: it was not written by nlbench.results.")
        try:
            version = int(raw_version)
        except ValueError:
            raise ResultsError(f"results file {path}: {SCHEMA_VERSION_KEY} is {raw_version!r}, not an integer.") from None
        if version > SCHEMA_VERSION:
            raise ResultsError(
                f"results file {path} has schema version {version}, newer than this nlbench's {SCHEMA_VERSION}; "
                f"read it with the nlbench version that wrote it (or upgrade nlbench)."
            )
        written_for = meta.get(TABLE_KEY.encode(), b"").decode()
        if written_for != table:
            raise ResultsError(f"results file {path} holds table {written_for!r}, not {table!r}; it is in the wrong directory.")
        try:
            blob.seek(0)
            data = pq.read_table(blob)
        except (OSError, pa.ArrowException) as e:
            raise CorruptFileError(
                f"results file {path} is corrupt ({e}); re-run what wrote it (`nlbench run` recomputes the run)."
            ) from e
        prefixes = DYNAMIC_PREFIXES.get(table, ())
        expected = schema_for(table)
        for f in expected:
            if f.name not in data.schema.names and version < ADDED_IN.get((table, f.name), 1):
                data = data.append_column(f, pa.nulls(len(data), f.type))
            if f.name not in data.schema.names:
                raise ResultsError(f"results file {path} lacks column {f.name!r} of table {table!r} (schema v{version}).")
            got = data.schema.field(f.name).type
            if got != f.type:
                raise ResultsError(f"results file {path}: column {f.name!r} is {got}, expected {f.type}.")
        unknown = [n for n in data.schema.names if n not in expected.names and not (prefixes and n.startswith(prefixes))]
        if unknown:
            raise ResultsError(f"results file {path} has column(s) {unknown} that table {table!r} does not define.")
        return data

    def read_arrow(self, table: str) -> pa.Table:
        """All of a table as one Arrow table (validated; dynamic columns unified across files)."""
        parts = [self._read_file(table, n) for n in self._file_names(table)]
        if not parts:
            return schema_for(table).empty_table()
        try:
            schema = pa.unify_schemas([t.schema for t in parts], promote_options="permissive")
        except pa.ArrowException as e:
            raise ResultsError(f"table {table!r}: files disagree on column types ({e}).") from e
        fixed = schema_for(table).names
        ordered = pa.schema(
            [schema.field(n) for n in fixed] + sorted((f for f in schema if f.name not in fixed), key=lambda f: f.name),
            metadata=schema_for(table).metadata,
        )
        aligned = []
        for t in parts:
            cols = [t.column(n).cast(f.type) if n in t.schema.names else pa.nulls(len(t), f.type)
                    for n, f in zip(ordered.names, ordered)]
            aligned.append(pa.Table.from_arrays(cols, schema=ordered))
        return pa.concat_tables(aligned)

    def read(self, table: str):
        """All of a table as a DataFrame; empty with the table's columns when nothing was written."""
        return self.read_arrow(table).to_pandas()

    def completed_run_ids(self) -> set[str]:
        """Run ids whose ``runs`` row has status ``completed`` and whose files are all intact
        (see :meth:`check_runs`)."""
        return self.check_runs()[0]

    def check_runs(self) -> tuple[set[str], dict[str, str]]:
        """``(completed, damaged)``: the completed runs whose ``runs``, ``matrix`` and ``curves``
        files are all present and readable, and ``run id -> what is wrong`` for the others that
        claim (or may have claimed) completion - a corrupt ``runs`` file, or a completed run's
        ``matrix``/``curves`` file deleted or corrupt. A damaged run is incomplete: the next
        sweep recomputes it and its new files replace the damaged ones. Files of a newer schema
        version still raise: they are not damaged, and must not be overwritten."""
        done, damaged = set(), {}
        for name in self._file_names("runs"):
            try:
                runs = self._read_file("runs", name)
            except CorruptFileError as e:
                damaged[name.rsplit("/", 1)[-1].removesuffix(".parquet")] = str(e)
                continue
            for rid, status in zip(runs.column("run_id").to_pylist(), runs.column("status").to_pylist()):
                if status != "completed":
                    continue
                problem = None
                for table in ("matrix", "curves"):
                    p = self._name(table, rid)
                    if not self.location.exists(p):
                        problem = f"its {table} file {self.location.display(p)} is missing"
                        break
                    try:
                        self._read_file(table, p)
                    except CorruptFileError as e:
                        problem = str(e)
                        break
                if problem is None:
                    done.add(rid)
                else:
                    damaged[rid] = problem
        return done, damaged
