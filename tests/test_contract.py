"""Dataset contract: a dataset written from the contract text alone passes; corrupt copies are rejected by column."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylsm.data.check import iter_problems, validate_dataset
from raylsm.data.contract import ContractError, read_manifest


def _write_independent_dataset(root: Path) -> None:
    """Writes a dataset following docs/design.md, "Dataset contract" only (own types, no raylsm writer), with a hive partition."""
    def rows(n: int, ts0: int, seed: int) -> dict:
        out: dict = {k: [] for k in ("user_id", "item_id", "item_cate", "label", "ts", "profile_age", "profile_gender")}
        for k in ("st_tgt_items", "st_tgt_cates", "st_src_items", "st_src_cates", "ll_items", "ll_cates", "ll_ctx", "ll_gap"):
            out[k] = []
        for i in range(n):
            u = 1 + (i * 7 + seed) % 9
            out["user_id"].append(u)
            out["item_id"].append(1 + (i * 3) % 19)
            out["item_cate"].append(1 + i % 4)
            out["label"].append(int(i % 3 == 0))
            out["ts"].append(ts0 + i)
            out["profile_age"].append(i % 8)
            out["profile_gender"].append(i % 3)
            n_ll = i % 6
            out["ll_items"].append([20 + j for j in range(n_ll)])
            out["ll_cates"].append([5 + j % 3 for j in range(n_ll)])
            out["ll_ctx"].append([1 + j % 4 for j in range(n_ll)])
            out["ll_gap"].append([j for j in range(n_ll)])
            out["st_tgt_items"].append([1 + j for j in range(i % 3)])
            out["st_tgt_cates"].append([1 for _ in range(i % 3)])
            out["st_src_items"].append([30])
            out["st_src_cates"].append([7])
        return out

    schema = pa.schema(
        [("user_id", pa.int64()), ("item_id", pa.int64()), ("item_cate", pa.int64()), ("label", pa.int8()),
         ("ts", pa.int64()), ("profile_age", pa.int64()), ("profile_gender", pa.int64())]
        + [(k, pa.list_(pa.int64())) for k in ("st_tgt_items", "st_tgt_cates", "st_src_items", "st_src_cates",
                                                 "ll_items", "ll_cates", "ll_ctx", "ll_gap")]
    )
    (root / "train" / "day=1").mkdir(parents=True)
    (root / "test").mkdir(parents=True)
    pq.write_table(pa.Table.from_pydict(rows(30, 1000, 0), schema), root / "train" / "day=1" / "part-0.parquet")
    pq.write_table(pa.Table.from_pydict(rows(20, 2000, 1), schema), root / "train" / "part-1.parquet")
    pq.write_table(pa.Table.from_pydict(rows(10, 3000, 2), schema), root / "test" / "part-00000.parquet")
    manifest = {
        "format": "raylsm-dataset/1", "name": "independent",
        "vocab": {"item": 31, "cate": 8, "ctx": 16, "gap": 64, "user": 10, "profile": {"age": 8, "gender": 3}},
        "max_len": {"st": 50, "ll": 2000}, "domains": "cross",
        "splits": {"train": {"rows": 50}, "test": {"rows": 10}},
        "source": {"generator": "hand", "params": {}, "seed": 0},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    _write_independent_dataset(root)
    return root


def _rewrite(path: Path, fn) -> None:
    table = pq.read_table(path, partitioning=None)
    pq.write_table(fn(table), path)


def test_independent_dataset_passes(dataset):
    manifest = validate_dataset(dataset)
    assert manifest.profile_fields == ["age", "gender"]
    assert manifest.vocab["item"] == 31


def test_label_3_rejected(dataset):
    shard = dataset / "test" / "part-00000.parquet"
    _rewrite(shard, lambda t: t.set_column(t.schema.get_field_index("label"), "label",
                                           pa.array([3] + [0] * (t.num_rows - 1), pa.int8())))
    problems = list(iter_problems(dataset))
    assert len(problems) == 1
    assert str(shard) in problems[0] and "column 'label'" in problems[0] and "3" in problems[0]


def test_id_beyond_vocab_rejected(dataset):
    shard = dataset / "train" / "part-1.parquet"
    bad = [[20, 99]] + [[21]] * 19
    _rewrite(shard, lambda t: t.set_column(t.schema.get_field_index("ll_items"), "ll_items", pa.array(bad, pa.list_(pa.int64()))))
    problems = list(iter_problems(dataset))
    assert any("column 'll_items'" in p and "99" in p and "vocab" in p for p in problems), problems
    # ll_items lengths now differ from ll_cates: reported too, naming the column.
    assert any("column 'll_cates'" in p and "lengths" in p for p in problems)


def test_missing_ll_ctx_rejected(dataset):
    shard = dataset / "train" / "day=1" / "part-0.parquet"
    _rewrite(shard, lambda t: t.drop_columns(["ll_ctx"]))
    with pytest.raises(ContractError) as e:
        validate_dataset(dataset)
    assert any(str(shard) in p and "column 'll_ctx': missing" in p for p in e.value.problems)


def test_other_violations(dataset, tmp_path):
    # Negative profile id, wrong type, temporal split, row count, bad manifest.
    shard = dataset / "test" / "part-00000.parquet"
    _rewrite(shard, lambda t: t.set_column(t.schema.get_field_index("ts"), "ts", pa.array([5] * t.num_rows, pa.int64())))
    problems = list(iter_problems(dataset))
    assert any("column 'ts'" in p and "temporal" in p for p in problems)

    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    m = json.loads((other / "manifest.json").read_text())
    m["vocab"]["item"] = "many"
    m["splits"]["train"]["rows"] = 49
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ContractError) as e:
        read_manifest(other)
    assert "vocab.item" in e.value.problems[0]

    m["vocab"]["item"] = 31
    (other / "manifest.json").write_text(json.dumps(m))
    _rewrite(other / "train" / "part-1.parquet",
             lambda t: t.set_column(t.schema.get_field_index("profile_age"), "profile_age", pa.array([-1] * t.num_rows, pa.int64())))
    problems = list(iter_problems(other))
    assert any("column 'profile_age'" in p and "-1" in p for p in problems)
    assert any("splits.train.rows" in p and "49" in p for p in problems)


def test_missing_directory_and_manifest(tmp_path):
    assert "does not exist" in list(iter_problems(tmp_path / "nope"))[0]
    (tmp_path / "empty").mkdir()
    assert "manifest.json: missing" in list(iter_problems(tmp_path / "empty"))[0]


def test_truncated_shard_is_one_line_without_a_row_count(dataset):
    shard = dataset / "train" / "part-1.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    problems = list(iter_problems(dataset))
    assert len(problems) == 1, problems
    assert str(shard) in problems[0] and "not a readable Parquet file" in problems[0]


def test_corrupt_data_pages_named_without_a_row_count(dataset):
    # Footer intact, column data overwritten: the file opens, reading its rows fails.
    shard = dataset / "train" / "part-1.parquet"
    data = bytearray(shard.read_bytes())
    for i in range(8, len(data) // 2):
        data[i] = 0xFF
    shard.write_bytes(bytes(data))
    problems = list(iter_problems(dataset))
    assert problems and all("shards hold" not in p for p in problems), problems
    assert any(str(shard) in p for p in problems), problems


def test_null_label_reported_once(dataset):
    shard = dataset / "test" / "part-00000.parquet"
    _rewrite(shard, lambda t: t.set_column(t.schema.get_field_index("label"), "label",
                                           pa.array([None, 1] + [0] * (t.num_rows - 2), pa.int8())))
    problems = list(iter_problems(dataset))
    assert problems == [f"{shard}: column 'label': 1 null values"]


def test_null_id_reported_once(dataset):
    shard = dataset / "test" / "part-00000.parquet"
    _rewrite(shard, lambda t: t.set_column(t.schema.get_field_index("item_id"), "item_id",
                                           pa.array([None] * 2 + [1] * (t.num_rows - 2), pa.int64())))
    problems = list(iter_problems(dataset))
    assert problems == [f"{shard}: column 'item_id': 2 null values"]


def test_yaml_syntax_error_names_line(tmp_path):
    from raylsm.config import ConfigError, load_yaml

    path = tmp_path / "job.yaml"
    path.write_text("model:\n  preset: lcn\ntrain:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:5:") and "not valid YAML" in message, message


def test_shards_gone_names_each_deleted_shard(dataset):
    from raylsm.data.contract import list_shards, shards_gone

    shards = list_shards(dataset)
    assert len(shards) == 3 and shards_gone(shards) is None
    shards[1].unlink()
    error = shards_gone(shards)
    assert error is not None and error.problems == [f"{shards[1]}: shard deleted or moved while training read the dataset"]


def test_wrong_column_type_is_one_line_without_a_row_count(dataset):
    shard = dataset / "test" / "part-00000.parquet"
    _rewrite(shard, lambda t: t.set_column(t.schema.get_field_index("label"), "label", t.column("label").cast(pa.float32())))
    problems = list(iter_problems(dataset))
    assert problems == [f"{shard}: column 'label': must be int8, got float"]


# ----------------------------------------------------------------------------- the val split


def _declare_val(dataset: Path, rows: int) -> None:
    m = json.loads((dataset / "manifest.json").read_text())
    m["splits"]["val"] = {"rows": rows}
    (dataset / "manifest.json").write_text(json.dumps(m))


def _val_from_train(dataset: Path, ts_shift: int) -> Path:
    """A val shard: the 20 rows of train/part-1.parquet with ``ts`` moved by ``ts_shift``."""
    table = pq.read_table(dataset / "train" / "part-1.parquet", partitioning=None)
    ts = pa.array([t + ts_shift for t in table.column("ts").to_pylist()], pa.int64())
    (dataset / "val").mkdir()
    shard = dataset / "val" / "part-00000.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("ts"), "ts", ts), shard)
    return shard


def test_garbage_val_shard_fails_data_check(dataset, capsys):
    from raylsm.cli import main

    _declare_val(dataset, 5)
    (dataset / "val").mkdir()
    shard = dataset / "val" / "part-00000.parquet"
    shard.write_bytes(b"this is not parquet\n" * 10)
    assert main(["data", "check", str(dataset)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{shard}: not a readable Parquet file"), err


def test_val_split_checked_like_train_and_test(dataset):
    _declare_val(dataset, 20)
    assert list(iter_problems(dataset)) == [f"{dataset / 'val'}: no Parquet shards found for split 'val'"]
    shard = _val_from_train(dataset, 500)  # ts 2500..2519: between train (..2019) and test (3000..)
    assert list(iter_problems(dataset)) == []
    _rewrite(shard, lambda t: t.set_column(t.schema.get_field_index("label"), "label",
                                           pa.array([7] * t.num_rows, pa.int8())))
    assert list(iter_problems(dataset)) == [f"{shard}: column 'label': 20 values not in {{0,1}} (e.g. 7)"]
    _declare_val(dataset, 21)
    _rewrite(shard, lambda t: t.set_column(t.schema.get_field_index("label"), "label",
                                           pa.array([0] * t.num_rows, pa.int8())))
    assert list(iter_problems(dataset)) == [
        f"{dataset / 'manifest.json'}: key 'splits.val.rows' is 21 but the shards hold 20 rows"]


def test_val_split_must_lie_between_train_and_test(dataset):
    _declare_val(dataset, 20)
    _val_from_train(dataset, 5000)  # ts 7000..7019: after the test split (3000..3009)
    problems = list(iter_problems(dataset))
    assert problems == [f"{dataset / 'test'}: column 'ts': temporal split violated: val impressions reach ts=7019 "
                        "but test impressions start at ts=3000"], problems


def test_declared_val_without_shards_is_an_error_before_training(dataset):
    from raylsm.config import ConfigError
    from raylsm.data.splits import plan_splits

    _declare_val(dataset, 20)
    with pytest.raises(ConfigError, match=r"val: the manifest declares a 'val' split but it holds no Parquet shards"):
        plan_splits(dataset, read_manifest(dataset), 0.1)
    _val_from_train(dataset, 500)
    plan = plan_splits(dataset, read_manifest(dataset), 0.1)
    assert plan.how == "manifest" and plan.val_rows == 20 and plan.val.split == "val"


# ----------------------------------------------------------------------------- the manifest schema


def _set(path: str, value):
    def edit(m: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        m[last] = value
    return edit


def _deep(levels: int):
    v: list = []
    for _ in range(levels - 1):
        v = [v]
    return v


@pytest.mark.parametrize("edit, expected", [
    (_set("vocab.brand", [1]), "key 'vocab.brand' must be a positive integer, got a list"),
    (_set("vocab.brand", None), "key 'vocab.brand' must be a positive integer, got null"),
    (_set("vocab.item", None), "key 'vocab.item' must be a positive integer, got null"),
    (_set("vocab.item", True), "key 'vocab.item' must be a positive integer, got True"),
    (_set("vocab.item", 3.0), "key 'vocab.item' must be a positive integer, got 3.0"),
    (_set("vocab", None), "key 'vocab' must be an object, got null"),
    (_set("vocab.profile", None), "key 'vocab.profile' must be an object, got null"),
    (_set("vocab.profile.age", "8"), "key 'vocab.profile.age' must be a positive integer, got '8'"),
    (_set("splits.val", 5), "key 'splits.val' must be an object, got 5"),
    (_set("splits.val", {"rows": "5"}), "key 'splits.val.rows' must be a non-negative integer, got '5'"),
    (_set("splits.train", {}), "key 'splits.train.rows' missing"),
    (_set("splits.extra", {"rows": 1}), "key 'splits.extra' unknown (expected train, test, val)"),
    (_set("max_len.st", -1), "key 'max_len.st' must be a non-negative integer, got -1"),
    (_set("max_len.extra", {"a": 1}), "key 'max_len.extra' must be a non-negative integer, got an object"),
    (_set("name", 5), "key 'name' must be a string, got 5"),
    (_set("domains", ["cross"]), "key 'domains' must be 'cross' or 'single', got a list"),
    (_set("format", None), "key 'format' must be 'raylsm-dataset/1', got null"),
    (_set("source", [1, 2]), "key 'source' must be a JSON object, got a list"),
    (_set("source.notes", _deep(40)), "nested deeper than 32 levels"),
    (lambda m: m.pop("max_len"), "key 'max_len' missing"),
])
def test_manifest_field_types_are_one_line_each(dataset, capsys, edit, expected):
    from raylsm.cli import main

    m = json.loads((dataset / "manifest.json").read_text())
    edit(m)
    (dataset / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ContractError) as e:
        read_manifest(dataset)
    assert e.value.problems == [f"{dataset / 'manifest.json'}: {expected}"]
    assert main(["data", "check", str(dataset)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{dataset / 'manifest.json'}: {expected}"]


def test_unknown_top_level_keys_are_allowed(dataset):
    m = json.loads((dataset / "manifest.json").read_text())
    m["comment"] = {"by": ["hand"], "n": None}
    (dataset / "manifest.json").write_text(json.dumps(m))
    assert list(iter_problems(dataset)) == []


def test_manifest_nested_past_the_json_parser_is_one_line(dataset, capsys):
    from raylsm.cli import main

    path = dataset / "manifest.json"
    path.write_text('{"format": "raylsm-dataset/1", "source": ' + "[" * 200_000 + "]" * 200_000 + "}")
    assert main(["data", "check", str(dataset)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"{path}: nested deeper than 32 levels"]


def test_oversized_manifest_is_refused_unread(dataset, capsys):
    import resource
    import time

    from raylsm.cli import main

    path = dataset / "manifest.json"
    with open(path, "r+b") as f:
        f.truncate(1 << 30)  # 1 GiB (sparse): refused from its size, never read
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    assert main(["data", "check", str(dataset)]) == 1
    assert time.perf_counter() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 * 1024  # KiB: far below 1 GiB
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{path}: 1073741824 bytes, over the 1048576 byte (1 MiB) limit of a manifest"]
    path.write_text(" " * (1 << 20) + "{}")  # just over the limit
    with pytest.raises(ContractError, match=r"1048578 bytes, over the 1048576 byte \(1 MiB\) limit"):
        read_manifest(dataset)
