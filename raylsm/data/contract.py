"""Dataset contract v1 (docs/design.md, "Dataset contract"): the format of a dataset.

A dataset is ``<dir>/manifest.json`` plus Parquet shards under ``<dir>/train``
and ``<dir>/test`` (any partition depth), and ``<dir>/val`` when the manifest
declares a ``val`` split. This module holds the format: the column names and
types (the single source of truth; writers, the synthetic generator and the
Taobao converters, build their tables with :func:`arrow_schema`), the
:class:`Manifest`, whose every field is checked against one declarative table
(:data:`MANIFEST_SCHEMA`) by :func:`read_manifest` (a manifest over 1 MiB is
refused before it is read), and the shards of each split (:func:`shard_files`,
:func:`list_shards`, :func:`shards_gone`). The shards' data are checked in
:mod:`raylsm.data.check`, whose :func:`~raylsm.data.check.validate_dataset`
readers call before any training starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

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
