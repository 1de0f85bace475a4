"""The data checks of a dataset's shards against contract v1 (docs/design.md, "Dataset contract").

:func:`iter_problems` reads the manifest (:func:`raylsm.data.contract.read_manifest`), then every
shard of every declared split, and yields one line per violation: a column missing or of the wrong
type, a null, a label not 0/1, an id outside its vocabulary, unequal list lengths within a
sequence, a split's row count unlike the manifest's, train/val/test times that overlap.
:func:`validate_dataset` raises them as one :class:`~raylsm.data.contract.ContractError`.
Shards are streamed record batch by record batch, so memory is bounded by one batch, not by the
dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylsm.data.contract import (
    ID_RANGES,
    PROFILE_PREFIX,
    SEQUENCE_GROUPS,
    VAL_SPLIT,
    ContractError,
    Manifest,
    arrow_schema,
    declared_splits,
    read_manifest,
    shard_files,
)


def _type_problem(col: str, actual: pa.DataType, expected: pa.DataType) -> str | None:
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        if not (pa.types.is_list(actual) or pa.types.is_large_list(actual)):
            return f"must be list<int64>, got {actual}"
        if actual.value_type != pa.int64():
            return f"must be list<int64>, got {actual}"
        return None
    if actual != expected:
        return f"must be {expected}, got {actual}"
    return None


def _schema_problems(path: Path, schema: pa.Schema, expected: pa.Schema) -> list[str]:
    out = []
    names = set(schema.names)
    for f in expected:
        if f.name not in names:
            out.append(f"{path}: column '{f.name}': missing")
            continue
        problem = _type_problem(f.name, schema.field(f.name).type, f.type)
        if problem:
            out.append(f"{path}: column '{f.name}': {problem}")
    extra_profile = [n for n in schema.names if n.startswith(PROFILE_PREFIX) and n not in expected.names]
    for n in extra_profile:
        out.append(f"{path}: column '{n}': profile field not declared in manifest vocab.profile")
    return out


def _range_problem(values: pa.Array, lo: int, hi: int) -> str | None:
    if len(values) == 0:
        return None
    if values.null_count:
        return f"{values.null_count} null values"
    mn, mx = pc.min_max(values).values()
    mn, mx = mn.as_py(), mx.as_py()
    if mn < lo:
        return f"id {mn} below the minimum {lo}" + (" (0 is reserved for padding)" if lo == 1 and mn == 0 else "")
    if mx >= hi:
        return f"id {mx} out of range: must be < vocab size {hi}"
    return None


def _batch_problems(path: Path, batch: pa.RecordBatch, manifest: Manifest, ranges: dict[str, tuple[int, int]]) -> list[str]:
    out: list[str] = []
    for name in batch.schema.names:
        col = batch.column(name)
        if col.null_count:
            out.append(f"{path}: column '{name}': {col.null_count} null values")
    label = pc.drop_null(batch.column("label"))  # nulls are reported once, above
    outside = pc.invert(pc.is_in(label, pa.array([0, 1], pa.int8())))
    bad = pc.sum(outside).as_py()
    if bad:
        example = pc.filter(label, outside)[0].as_py()
        out.append(f"{path}: column 'label': {bad} values not in {{0,1}} (e.g. {example})")
    for name, (lo, hi) in ranges.items():
        col = batch.column(name)
        values = pc.list_flatten(col) if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) else col
        problem = None if col.null_count else _range_problem(values, lo, hi)  # nulls reported above
        if problem:
            out.append(f"{path}: column '{name}': {problem}")
    for group, cols in SEQUENCE_GROUPS.items():
        lengths = [pc.list_value_length(batch.column(c)) for c in cols]
        for c, ln in zip(cols[1:], lengths[1:]):
            if not pc.all(pc.equal(ln, lengths[0])).as_py():
                out.append(f"{path}: column '{c}': list lengths differ from '{cols[0]}' in some rows")
    return out


def _ts_range(path: Path, batch: pa.RecordBatch) -> tuple[int, int] | None:
    ts = batch.column("ts")
    if len(ts) == 0:
        return None
    mn, mx = pc.min_max(ts).values()
    return mn.as_py(), mx.as_py()


def _batch_rows(pf: pq.ParquetFile, target_bytes: int) -> int:
    """Rows per validation batch so that one batch is about ``target_bytes`` uncompressed (long lists -> fewer rows)."""
    meta = pf.metadata
    if meta.num_rows == 0 or meta.num_row_groups == 0:
        return 1024
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    per_row = max(size / meta.num_rows, 1.0)
    return int(min(65536, max(64, target_bytes // per_row)))


def iter_problems(root: str | os.PathLike, batch_bytes: int = 64 << 20) -> Iterator[str]:
    """Yield one line per contract violation in the dataset at ``root`` (empty when valid).

    Shards are read in batches of about ``batch_bytes`` (uncompressed), so memory stays bounded
    whatever the sequence lengths.
    """
    try:
        manifest = read_manifest(root)
    except ContractError as e:
        yield from e.problems
        return
    expected = arrow_schema(manifest.profile_fields)
    ranges: dict[str, tuple[int, int]] = {c: (lo, manifest.vocab[k]) for c, (k, lo) in ID_RANGES.items()}
    for f, size in manifest.profile_vocab.items():
        ranges[PROFILE_PREFIX + f] = (0, size)
    ts_bounds: dict[str, tuple[int, int]] = {}
    for split in declared_splits(manifest):
        files = shard_files(root, split)
        if not files:
            yield f"{Path(root) / split}: no Parquet shards found for split '{split}'"
            continue
        rows = 0
        counted = True  # False once a shard could not be read: its rows are unknown, so no row-count line
        for path in files:
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # unreadable file: report, keep checking the others
                yield f"{path}: not a readable Parquet file ({type(e).__name__}: {e})"
                counted = False
                continue
            schema = pf.schema_arrow
            problems = _schema_problems(path, schema, expected)
            rows += pf.metadata.num_rows  # the footer's count: known even when the schema is wrong
            if problems:
                yield from problems
                continue
            seen: set[str] = set()
            try:
                for batch in pf.iter_batches(batch_size=_batch_rows(pf, batch_bytes), columns=expected.names):
                    for p in _batch_problems(path, batch, manifest, ranges):
                        if p not in seen:  # report each problem once per file
                            seen.add(p)
                            yield p
                    bounds = _ts_range(path, batch)
                    if bounds:
                        lo, hi = ts_bounds.get(split, bounds)
                        ts_bounds[split] = (min(lo, bounds[0]), max(hi, bounds[1]))
            except (OSError, pa.ArrowException) as e:  # footer readable, data pages not (truncated or corrupt)
                yield f"{path}: not a readable Parquet file ({type(e).__name__}: {e})"
                counted = False
        declared = manifest.splits.get(split, {}).get("rows")
        if counted and declared is not None and declared != rows:
            yield f"{Path(root) / 'manifest.json'}: key 'splits.{split}.rows' is {declared} but the shards hold {rows} rows"
    order = [s for s in ("train", VAL_SPLIT, "test") if s in ts_bounds]
    for earlier, later in zip(order, order[1:]):  # train before val before test
        if ts_bounds[earlier][1] > ts_bounds[later][0]:
            yield (
                f"{Path(root) / later}: column 'ts': temporal split violated: {earlier} impressions reach "
                f"ts={ts_bounds[earlier][1]} but {later} impressions start at ts={ts_bounds[later][0]}"
            )


def validate_dataset(root: str | os.PathLike) -> Manifest:
    """Validate the whole dataset; return its manifest or raise :class:`ContractError`."""
    problems = list(iter_problems(root))
    if problems:
        raise ContractError(problems)
    return read_manifest(root)

