"""Read one or many result directories into one set of tables, never counting a run twice.

Every table goes through ``ResultStore.read`` (schema validation, corrupt files, schema versions
from the future): the report must fail loudly rather than print wrong numbers. A run id found in
two directories is kept once, with a warning, when both copies agree, and is an error when they
disagree (the report cannot know which one is right).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

TABLES = ("runs", "matrix", "curves", "throughput")
# Columns that legitimately differ between two executions of the same run (where and how fast it
# ran); two copies of a run id that differ only here are the same result.
NOT_COMPARED = {
    "runs": {"started_at", "finished_at", "wall_s", "train_s", "eval_s", "device", "host", "versions", "git_sha",
             "train_tokens_per_s"},
}


class ReportError(Exception):
    """Input the report cannot turn into correct numbers (the CLI exits non-zero)."""


@dataclass
class Results:
    runs: pd.DataFrame
    matrix: pd.DataFrame
    curves: pd.DataFrame
    throughput: pd.DataFrame
    sources: list[str]
    warnings: list[str] = field(default_factory=list)

    def has(self, table: str) -> bool:
        return not getattr(self, table).empty


DEVICE_CHECK = "device_check.json"
_CHECK_ROW = {"model": str, "size": str, "seq_len": int, "batch_size": int, "phase": str, "tokens_per_s": float}
# optional fields a row may carry (null or absent allowed); anything else in them is refused
_CHECK_OPTIONAL = {**{k: float for k in ("step_ms_p50", "step_ms_p95", "peak_mem_bytes", "mfu", "mfu_datasheet",
                                         "flops_per_token", "params", "compile_s", "steps")},
                   "device": str, "dtype": str, "memory_kernel": str, "compiled": bool}


def _check_value(v, t, required: bool) -> bool:
    import math

    if v is None:
        return not required
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, t)


def device_check_rows(loc) -> pd.DataFrame:
    """The measured cases of ``python -m nlbench.bench.device_check``'s JSON as throughput rows: Hope
    on the Triton memory kernel is its own model (`hope[triton]`), compiled cases carry
    compile_mode `default`. The file is parsed as JSON data only; a malformed one is a ReportError."""
    import json

    where = loc.display(DEVICE_CHECK)
    try:
        doc = json.loads(loc.read(DEVICE_CHECK).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ReportError(f"{where} is not the JSON that device_check writes: {e}") from e
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not isinstance(doc.get("device"), str):
        raise ReportError(f"{where} is not the JSON that device_check writes: it needs 'device' and a list 'rows'")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ReportError(f"{where}: row {i} is not a mapping")
        bad = [k for k, t in _CHECK_ROW.items() if not _check_value(r.get(k), t, True)]
        bad += [k for k, t in _CHECK_OPTIONAL.items() if not _check_value(r.get(k), t, False)]
        if bad:
            raise ReportError(f"{where}: row {i} lacks a valid {', '.join(bad)}")
        kernel = r.get("memory_kernel")
        model = r["model"] + (f"[{kernel}]" if kernel else "")
        mode = "default" if r.get("compiled") else None
        keep = {k: r.get(k) for k in ("step_ms_p50", "step_ms_p95", "peak_mem_bytes", "mfu", "mfu_datasheet",
                                      "flops_per_token", "params", "compile_s", "steps")}
        out.append(dict(keep, **{k: r[k] for k in _CHECK_ROW if k != "model"}, model=model, compile_mode=mode,
                        device=r.get("device") or doc["device"], dtype=r.get("dtype") or doc.get("dtype"),
                        matmul_peak_flops=doc.get("matmul_peak"),
                        # one measurement per file: two files of one device are two measurements (medians)
                        run_id=f"{where}:{model}:{r['size']}:{r['seq_len']}:{r['batch_size']}:{r['phase']}:{mode}"))
    return pd.DataFrame(out)


def _read_table(out, table: str) -> pd.DataFrame | None:
    """``out``: a :class:`nlbench.storage.Location` (a directory or an object-store prefix)."""
    from nlbench.results import ResultStore

    if not out.is_dir(table):
        return None
    try:
        df = ResultStore(out).read(table)
    except Exception as e:  # the store's own error already names the file and the reason
        raise ReportError(f"cannot read table {table!r} of results directory {out}: {e}") from e
    return df


def _dedupe(frames: list[tuple[str, pd.DataFrame]], table: str, warnings: list[str]) -> pd.DataFrame:
    """Concatenate one table from several directories, each run id once.

    A run id present in more than one directory is kept from the first directory when every
    copy holds the same rows, and is an error otherwise.
    """
    frames = [(src, df) for src, df in frames if df is not None and not df.empty]
    if not frames:
        return pd.DataFrame()
    seen: dict[str, tuple[str, pd.DataFrame]] = {}
    parts = []
    for src, df in frames:
        if "run_id" not in df.columns:
            raise ReportError(f"table {table!r} in {src} has no 'run_id' column; columns are {sorted(df.columns)}")
        dup_ids = sorted(set(df["run_id"]) & set(seen))
        for rid in dup_ids:
            first_src, first_df = seen[rid]
            a = _canonical(first_df[first_df["run_id"] == rid], table)
            b = _canonical(df[df["run_id"] == rid], table)
            if not a.equals(b):
                raise ReportError(
                    f"run id {rid!r} appears in both {first_src} and {src} with different {table!r} rows; "
                    "the report will not guess which copy is right. Remove one of the copies or pass only "
                    "one of the directories."
                )
        if dup_ids:
            warnings.append(
                f"{len(dup_ids)} run id(s) of table {table!r} in {src} were already read from an earlier "
                f"directory with identical rows; counted once (e.g. {dup_ids[0]!r})."
            )
            df = df[~df["run_id"].isin(dup_ids)]
        for rid in df["run_id"].unique():
            seen[rid] = (src, df)
        parts.append(df.assign(source=src))
    return pd.concat(parts, ignore_index=True)


def _canonical(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Rows of one run in an order and form that compares equal across directories."""
    skip = {"source"} | NOT_COMPARED.get(table, set())
    df = df.drop(columns=[c for c in df.columns if c in skip])
    df = df[sorted(df.columns)].astype(str)
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def load_results(dirs: list[str | Path]) -> Results:
    """Read runs/matrix/curves/throughput from every directory in ``dirs``.

    Raises ReportError when a directory is missing, holds none of the tables, or a table cannot
    be read; missing optional tables become warnings.
    """
    if not dirs:
        raise ReportError("no results directory given")
    warnings: list[str] = []
    per_table: dict[str, list[tuple[str, pd.DataFrame]]] = {t: [] for t in TABLES}
    from nlbench.storage import StorageError, location

    for d in dirs:
        try:
            loc = location(d)
            exists = loc.is_dir()
        except (StorageError, OSError) as e:
            raise ReportError(f"results location {d} cannot be read: {e}") from e
        out = loc.display()
        if not exists:
            raise ReportError(f"results directory {out} does not exist (expected a directory written by `nlbench run` or `nlbench bench`)")
        try:
            found = {t: _read_table(loc, t) for t in TABLES}
            checked = device_check_rows(loc) if loc.exists(DEVICE_CHECK) else None
        except (StorageError, OSError) as e:
            raise ReportError(f"results location {out} cannot be read: {e}") from e
        if checked is not None:  # the accelerator check's cases are throughput rows like the bench's
            found["throughput"] = checked if found["throughput"] is None else pd.concat([found["throughput"], checked])
        if all(v is None for v in found.values()):
            raise ReportError(
                f"results directory {out} holds none of the tables {', '.join(TABLES)} (nor {DEVICE_CHECK}); "
                "is it the OUT of `nlbench run`, `nlbench bench` or `python -m nlbench.bench.device_check`?"
            )
        if found["runs"] is not None and found["matrix"] is None:
            raise ReportError(f"results directory {out} has a 'runs' table but no 'matrix' table; its runs cannot be scored")
        if found["runs"] is not None and found["curves"] is None:
            warnings.append(f"{out} has no 'curves' table: no forgetting curves for its runs")
        for t, df in found.items():
            per_table[t].append((str(out), df))
    tables = {t: _dedupe(per_table[t], t, warnings) for t in TABLES}
    if not tables["runs"].empty:
        known = set(tables["runs"]["run_id"])
        for t in ("matrix", "curves"):
            if not tables[t].empty:
                orphans = set(tables[t]["run_id"]) - known
                if orphans:
                    warnings.append(f"{len(orphans)} run id(s) in table {t!r} have no row in 'runs' and are ignored")
                    tables[t] = tables[t][tables[t]["run_id"].isin(known)]
    return Results(**tables, sources=[str(d) for d in dirs], warnings=warnings)
