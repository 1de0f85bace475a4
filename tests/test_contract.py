"""Dataset contract: a dataset written from the contract text alone passes; corrupt copies are rejected by column."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylsm.data.contract import ContractError, iter_problems, read_manifest, validate_dataset


def _write_independent_dataset(root: Path) -> None:
    """Writes a dataset following DESIGN §2 only (own types, no raylsm writer), with a hive partition."""
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
