"""Dataset contract v1 (docs/design.md, "Dataset contract"): schema, manifest, and validation.

A dataset is ``<dir>/manifest.json`` plus Parquet shards under ``<dir>/train``
and ``<dir>/test`` (any partition depth), and ``<dir>/val`` when the manifest
declares a ``val`` split (checked like the others). Every manifest field is
checked against one declarative table (:data:`MANIFEST_SCHEMA`); a manifest
over 1 MiB is refused before it is read. This module is the single source of
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
SPLITS = ("train", "test")  # every dataset has these
VAL_SPLIT = "val"  # optional: checked like the others when the manifest declares it

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
        # Every field was checked against MANIFEST_SCHEMA: plain copies, no casts.
        return cls(
            name=obj["name"],
            vocab={k: v for k, v in obj["vocab"].items() if k != "profile"},
            profile_vocab=dict(obj["vocab"]["profile"]),
            max_len=dict(obj["max_len"]),
            domains=obj["domains"],
            splits={k: {"rows": v["rows"]} for k, v in obj["splits"].items()},
            source=obj.get("source", {}),
        )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- manifest schema

MANIFEST_MAX_BYTES = 1 << 20  # a manifest is a few KiB; anything past 1 MiB is refused unread
MANIFEST_MAX_DEPTH = 32  # nesting levels of objects/arrays anywhere in the manifest


@dataclass(frozen=True)
class _Int:
    """An integer (never a bool) ``>= low``."""

    low: int

    def problem(self, v: object) -> str | None:
        if _is_int(v) and v >= self.low:
            return None
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(self.low, f"an integer >= {self.low}")
        return f"must be {what}, got {_show(v)}"


@dataclass(frozen=True)
class _Str:
    def problem(self, v: object) -> str | None:
        return None if isinstance(v, str) else f"must be a string, got {_show(v)}"


@dataclass(frozen=True)
class _OneOf:
    """One of the given strings."""

    values: tuple[str, ...]

    def problem(self, v: object) -> str | None:
        if isinstance(v, str) and v in self.values:
            return None
        return f"must be {' or '.join(repr(x) for x in self.values)}, got {_show(v)}"


@dataclass(frozen=True)
class _Json:
    """Any JSON value (its depth is bounded for the whole manifest)."""

    kind: type = object

    def problem(self, v: object) -> str | None:
        if self.kind is object or isinstance(v, self.kind):
            return None
        return f"must be a JSON {'object' if self.kind is dict else self.kind.__name__}, got {_show(v)}"


@dataclass(frozen=True)
class _Obj:
    """A JSON object: ``fields`` (name -> (spec, required)); other keys must match ``extra`` (None: none allowed)."""

    fields: dict
    extra: object = None
    extra_what: str = ""

    def problem(self, v: object) -> str | None:
        return None if isinstance(v, dict) else f"must be an object, got {_show(v)}"


def _show(v: object) -> str:
    text = "null" if v is None else repr(v) if not isinstance(v, (dict, list)) else ("an object" if isinstance(v, dict) else "a list")
    return text if len(text) <= 60 else text[:57] + "..."


_POSITIVE, _COUNT = _Int(1), _Int(0)
_SPLIT = _Obj({"rows": (_COUNT, True)})
# The manifest, field by field (docs/design.md, "Dataset contract"). Unknown top-level keys are allowed (any JSON).
MANIFEST_SCHEMA = _Obj(
    {
        "format": (_OneOf((FORMAT,)), True),
        "name": (_Str(), True),
        "vocab": (_Obj(
            {**{k: (_POSITIVE, True) for k in ("item", "cate", "ctx", "gap", "user")},
             "profile": (_Obj({}, _POSITIVE, "profile field sizes"), True)},
            _POSITIVE, "vocabulary sizes"), True),
        "max_len": (_Obj({"st": (_COUNT, True), "ll": (_COUNT, True)}, _COUNT, "lengths"), True),
        "domains": (_OneOf(("cross", "single")), True),
        "splits": (_Obj({"train": (_SPLIT, True), "test": (_SPLIT, True), "val": (_SPLIT, False)}), True),
        "source": (_Json(dict), False),
    },
    _Json(),
)


def _too_deep(obj: object, limit: int) -> bool:
    """True when ``obj`` nests objects/arrays more than ``limit`` levels (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _schema_check(spec: object, value: object, key: str, where: str, out: list[str]) -> None:
    problem = spec.problem(value)  # type: ignore[attr-defined]
    if problem:
        out.append(f"{where}: key '{key}' {problem}")
        return
    if not isinstance(spec, _Obj):
        return
    prefix = f"{key}." if key else ""
    for name, (sub, required) in spec.fields.items():
        if name in value:  # type: ignore[operator]
            _schema_check(sub, value[name], prefix + name, where, out)  # type: ignore[index]
        elif required:
            out.append(f"{where}: key '{prefix + name}' missing")
    for name, v in value.items():  # type: ignore[attr-defined]
        if name in spec.fields:
            continue
        if spec.extra is None:
            out.append(f"{where}: key '{prefix + name}' unknown (expected {', '.join(spec.fields)})")
        else:
            _schema_check(spec.extra, v, prefix + name, where, out)


def _manifest_problems(obj: object, where: str) -> list[str]:
    """One line per field of ``obj`` that does not match :data:`MANIFEST_SCHEMA`."""
    if not isinstance(obj, dict):
        return [f"{where}: top level must be a JSON object, got {_show(obj)}"]
    if _too_deep(obj, MANIFEST_MAX_DEPTH):
        return [f"{where}: nested deeper than {MANIFEST_MAX_DEPTH} levels"]
    out: list[str] = []
    _schema_check(MANIFEST_SCHEMA, obj, "", where, out)
    return out


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and validate ``<root>/manifest.json``; raise :class:`ContractError` with one line per problem."""
    path = Path(root) / "manifest.json"
    if not Path(root).is_dir():
        raise ContractError([f"{root}: dataset directory does not exist"])
    if not path.is_file():
        raise ContractError([f"{path}: missing (a dataset directory needs a manifest.json)"])
    try:
        size = path.stat().st_size
        if size > MANIFEST_MAX_BYTES:
            raise ContractError([f"{path}: {size} bytes, over the {MANIFEST_MAX_BYTES} byte (1 MiB) limit of a manifest"])
        with open(path, "rb") as f:
            data = f.read(MANIFEST_MAX_BYTES + 1)
    except OSError as e:
        raise ContractError([f"{path}: not readable ({e.strerror or type(e).__name__})"]) from None
    if len(data) > MANIFEST_MAX_BYTES:
        raise ContractError([f"{path}: over the {MANIFEST_MAX_BYTES} byte (1 MiB) limit of a manifest"])
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ContractError([f"{path}: not UTF-8 text (byte {e.start})"]) from None
    except json.JSONDecodeError as e:
        raise ContractError([f"{path}: not valid JSON ({e.msg} at line {e.lineno})"]) from None
    except RecursionError:
        raise ContractError([f"{path}: nested deeper than {MANIFEST_MAX_DEPTH} levels"]) from None
    return Manifest.from_json(obj, str(path))


def declared_splits(manifest: Manifest) -> tuple[str, ...]:
    """The splits a dataset must hold: train, test, and val when its manifest declares one."""
    return (*SPLITS, VAL_SPLIT) if VAL_SPLIT in manifest.splits else SPLITS


def shard_files(root: str | os.PathLike, split: str) -> list[Path]:
    """All Parquet files of a split, at any partition depth, in a stable order."""
    base = Path(root) / split
    return sorted(p for p in base.rglob("*.parquet") if p.is_file())


def list_shards(root: str | os.PathLike) -> list[Path]:
    """Every shard of every split: what a training reads (see :func:`shards_gone`)."""
    return [p for split in (*SPLITS, VAL_SPLIT) for p in shard_files(root, split)]


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

