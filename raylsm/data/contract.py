"""Dataset contract v1 (DESIGN §2): schema, manifest, and validation.

A dataset is ``<dir>/manifest.json`` plus Parquet shards under ``<dir>/train``
and ``<dir>/test`` (any partition depth). This module is the single source of
truth for column names and types; writers (the synthetic generator, the Taobao
converters) build their tables with :func:`arrow_schema`, and readers call
:func:`validate_dataset` before any training starts.

Validation streams every shard record batch by record batch, so its memory is
bounded by one batch, not by the dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT = "raylsm-dataset/1"
SPLITS = ("train", "test")

SCALAR_COLUMNS: dict[str, pa.DataType] = {
    "user_id": pa.int64(),
    "item_id": pa.int64(),
    "item_cate": pa.int64(),
    "label": pa.int8(),
    "ts": pa.int64(),
}
LIST_COLUMNS: tuple[str, ...] = (
    "st_tgt_items", "st_tgt_cates",
    "st_src_items", "st_src_cates",
    "ll_items", "ll_cates", "ll_ctx", "ll_gap",
)
# Columns of one sequence must have equal list lengths row by row.
SEQUENCE_GROUPS: dict[str, tuple[str, ...]] = {
    "st_tgt": ("st_tgt_items", "st_tgt_cates"),
    "st_src": ("st_src_items", "st_src_cates"),
    "ll": ("ll_items", "ll_cates", "ll_ctx", "ll_gap"),
}
# (vocab key, minimum allowed id) per column; profile columns are added per manifest.
ID_RANGES: dict[str, tuple[str, int]] = {
    "user_id": ("user", 1),
    "item_id": ("item", 1),
    "item_cate": ("cate", 1),
    "st_tgt_items": ("item", 1),
    "st_tgt_cates": ("cate", 1),
    "st_src_items": ("item", 1),
    "st_src_cates": ("cate", 1),
    "ll_items": ("item", 1),
    "ll_cates": ("cate", 1),
    "ll_ctx": ("ctx", 0),
    "ll_gap": ("gap", 0),
}
PROFILE_PREFIX = "profile_"


class ContractError(ValueError):
    """A dataset violates the contract; ``problems`` holds one line per violation."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def arrow_schema(profile_fields: list[str]) -> pa.Schema:
    """The Parquet schema of contract v1 for the given profile field names (in order)."""
    fields = [pa.field(name, typ, nullable=False) for name, typ in SCALAR_COLUMNS.items()]
    fields += [pa.field(PROFILE_PREFIX + name, pa.int64(), nullable=False) for name in profile_fields]
    fields += [pa.field(name, pa.list_(pa.int64()), nullable=False) for name in LIST_COLUMNS]
    return pa.schema(fields)


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of a dataset."""

    name: str
    vocab: dict[str, int]
    profile_vocab: dict[str, int]
    max_len: dict[str, int]
    domains: str
    splits: dict[str, dict[str, int]]
    source: dict = field(default_factory=dict)

    @property
    def profile_fields(self) -> list[str]:
        return list(self.profile_vocab)

    def to_json(self) -> dict:
        vocab: dict = dict(self.vocab)
        vocab["profile"] = dict(self.profile_vocab)
        return {
            "format": FORMAT,
            "name": self.name,
            "vocab": vocab,
            "max_len": dict(self.max_len),
            "domains": self.domains,
            "splits": {k: dict(v) for k, v in self.splits.items()},
            "source": self.source,
        }

    def write(self, root: str | os.PathLike) -> Path:
        path = Path(root) / "manifest.json"
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, obj: dict, where: str = "manifest.json") -> "Manifest":
        problems = _manifest_problems(obj, where)
        if problems:
            raise ContractError(problems)
        vocab = {k: int(v) for k, v in obj["vocab"].items() if k != "profile"}
        return cls(
            name=str(obj["name"]),
            vocab=vocab,
            profile_vocab={k: int(v) for k, v in obj["vocab"]["profile"].items()},
            max_len={k: int(v) for k, v in obj["max_len"].items()},
            domains=obj["domains"],
            splits={k: {"rows": int(v["rows"])} for k, v in obj["splits"].items()},
            source=obj.get("source", {}),
        )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _manifest_problems(obj: object, where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: top level must be a JSON object"]
    out: list[str] = []
    if obj.get("format") != FORMAT:
        out.append(f"{where}: key 'format' must be {FORMAT!r}, got {obj.get('format')!r}")
    if not isinstance(obj.get("name"), str):
        out.append(f"{where}: key 'name' must be a string")
    vocab = obj.get("vocab")
    if not isinstance(vocab, dict):
        out.append(f"{where}: key 'vocab' must be an object")
    else:
        for key in ("item", "cate", "ctx", "gap", "user"):
            if not _is_int(vocab.get(key)) or vocab[key] < 1:
                out.append(f"{where}: key 'vocab.{key}' must be a positive integer, got {vocab.get(key)!r}")
        prof = vocab.get("profile")
        if not isinstance(prof, dict):
            out.append(f"{where}: key 'vocab.profile' must be an object of field -> size")
        else:
            for k, v in prof.items():
                if not _is_int(v) or v < 1:
                    out.append(f"{where}: key 'vocab.profile.{k}' must be a positive integer, got {v!r}")
    max_len = obj.get("max_len")
    if not isinstance(max_len, dict) or not all(_is_int(max_len.get(k)) and max_len[k] >= 0 for k in ("st", "ll")):
        out.append(f"{where}: key 'max_len' must hold non-negative integers 'st' and 'll'")
    if obj.get("domains") not in ("cross", "single"):
        out.append(f"{where}: key 'domains' must be 'cross' or 'single', got {obj.get('domains')!r}")
    splits = obj.get("splits")
    if not isinstance(splits, dict):
        out.append(f"{where}: key 'splits' must be an object")
    else:
        for s in SPLITS:
            rows = splits.get(s, {}).get("rows") if isinstance(splits.get(s), dict) else None
            if not _is_int(rows) or rows < 0:
                out.append(f"{where}: key 'splits.{s}.rows' must be a non-negative integer, got {rows!r}")
    return out


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and validate ``<root>/manifest.json``; raise :class:`ContractError` with one line per problem."""
    path = Path(root) / "manifest.json"
    if not Path(root).is_dir():
        raise ContractError([f"{root}: dataset directory does not exist"])
    if not path.is_file():
        raise ContractError([f"{path}: missing (a dataset directory needs a manifest.json)"])
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ContractError([f"{path}: not valid JSON ({e.msg} at line {e.lineno})"]) from None
    return Manifest.from_json(obj, str(path))


def shard_files(root: str | os.PathLike, split: str) -> list[Path]:
    """All Parquet files of a split, at any partition depth, in a stable order."""
    base = Path(root) / split
    return sorted(p for p in base.rglob("*.parquet") if p.is_file())


def list_shards(root: str | os.PathLike) -> list[Path]:
    """Every shard of every split: what a training reads (see :func:`shards_gone`)."""
    return [p for split in SPLITS for p in shard_files(root, split)]


def shards_gone(shards: list[Path]) -> ContractError | None:
    """The error to report when a training failed because shards it was reading were deleted or moved."""
    gone = [p for p in shards if not p.is_file()]
    if not gone:
        return None
    return ContractError([f"{p}: shard deleted or moved while training read the dataset" for p in gone])


# ----------------------------------------------------------------------------- validation


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
    for split in SPLITS:
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
    if "train" in ts_bounds and "test" in ts_bounds and ts_bounds["train"][1] > ts_bounds["test"][0]:
        yield (
            f"{Path(root) / 'test'}: column 'ts': temporal split violated: train impressions reach "
            f"ts={ts_bounds['train'][1]} but test impressions start at ts={ts_bounds['test'][0]}"
        )


def validate_dataset(root: str | os.PathLike) -> Manifest:
    """Validate the whole dataset; return its manifest or raise :class:`ContractError`."""
    problems = list(iter_problems(root))
    if problems:
        raise ContractError(problems)
    return read_manifest(root)

