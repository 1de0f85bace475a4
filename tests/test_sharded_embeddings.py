"""Row-sharded tables (:mod:`raylsm.models.sharded_embedding`): each of N ranks holds about 1/N of a table's rows,
and two gloo ranks, each on half of every batch, take the same SGD steps as one process on the whole batch.

Two sharded Ray Train workers training, checkpointing whole tables and resuming on one worker: the two-worker
run of ``tests/test_train_ray.py``.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as tmp_mp

from raylsm.config import ConfigError
from raylsm.models.sharded_embedding import RowShardedEmbedding, full_state_dict, shard_rows, shard_tables
from raylsm.train.config import resolve_job
from raylsm.train.optim import RowSparseOptimizer, sharded_tables, split_parameters
from tests.test_sparse_embeddings import VOCAB, _batches, _losses, _model, _sgd


def test_shards_partition_the_rows_and_keep_their_values():
    table = torch.nn.Embedding(1001, 4, padding_idx=0)
    shards = [RowShardedEmbedding.from_table(table, world=3, rank=r) for r in range(3)]
    assert [s.weight.shape[0] for s in shards] == [shard_rows(1001, 3, r) for r in range(3)] == [334, 334, 333]
    assert sum(s.weight.shape[0] for s in shards) == 1001
    for r, s in enumerate(shards):
        assert torch.equal(s.weight, table.weight[r::3])  # id i at local row i // 3 of rank i % 3


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _model(seed=0)
    full_rows = {n: t.weight.shape[0] for n, t in model.features.tables.items()}
    assert sorted(shard_tables(model)) == sorted(full_rows)
    dense, tables = split_parameters(model, sparse_tables=True)
    local = [t.weight for _, t in sharded_tables(model)]
    opt = RowSparseOptimizer(torch.optim.SGD(dense, lr=0.5), torch.optim.SGD(tables, lr=0.5), local=local)
    assert opt.tables == []  # nothing exchanged: each shard's gradient arrives whole at its owner
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    # This rank's own tensors hold about half of every table's rows.
    for name, t in model.features.tables.items():
        assert t.weight.shape[0] == shard_rows(full_rows[name], 2, rank) <= 0.6 * full_rows[name] + 1, name
    for batch in _batches(3, b=8):
        half = {k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()}  # (4, ...): this rank's half
        _losses(ddp, opt, [half])
    torch.save({k: v for k, v in model.state_dict().items()}, f"{out}.{rank}")
    whole = full_state_dict(model)  # a collective: the checkpoint layout of an unsharded model
    if rank == 0:
        torch.save(whole, f"{out}.whole")
    resumed = _model(seed=7)
    shard_tables(resumed)
    resumed.load_state_dict(whole)  # every rank takes its own rows of the whole tables
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_sharded_take_the_steps_of_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    tmp_mp.start_processes(_worker, args=(port, out), nprocs=2, start_method="spawn")
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    one = _model(seed=0)
    _losses(one, _sgd(one, 0.5, sparse=False), _batches(3, b=8))
    for name, value in one.state_dict().items():
        if name.startswith("features.tables."):
            whole = torch.empty_like(value)
            whole[0::2], whole[1::2] = parts[0][name], parts[1][name]
        else:
            whole = parts[0][name]
            torch.testing.assert_close(parts[1][name], whole, rtol=0, atol=0, msg=name)  # DDP: same on both
        torch.testing.assert_close(whole, value, rtol=1e-4, atol=1e-6, msg=name)


def test_whole_checkpoint_of_two_shards_loads_on_one_process_and_on_three_shards(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    tmp_mp.start_processes(_worker, args=(port, out), nprocs=2, start_method="spawn")
    whole = torch.load(f"{out}.whole", weights_only=True)
    one = _model(seed=3)
    one.load_state_dict(whole)  # unsharded, one process: the serving layout
    parts = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    item = "features.tables.item.weight"
    assert torch.equal(one.state_dict()[item][1::2], parts[1][item])
    for rank in range(3):  # another worker count: each of three ranks takes ids i % 3 == rank
        three = _model(seed=4)
        shard_tables(three, world=3, rank=rank)
        three.load_state_dict(whole)
        assert torch.equal(three.features.tables["item"].weight, whole[item][rank::3])
        assert three.features.tables["item"].weight.shape[0] == shard_rows(VOCAB.item, 3, rank)


def test_build_sharded_model_allocates_only_this_ranks_rows():
    from raylsm.models.registry import preset_config
    from raylsm.models.sharded_embedding import build_sharded_model, local_fraction
    from tests.test_sparse_embeddings import TINY

    cfg = preset_config("lap", {**TINY, "features": {"emb_dim": 8, "hash_buckets": 300, "item_dropout": 0.0}})
    model, names = build_sharded_model(cfg, VOCAB, world=2, rank=1, min_rows=20)
    assert names == ["item", "cate"]  # item always; cate (21 rows) >= min_rows; ctx, gap, profile tables stay whole
    item = model.features.tables["item"]
    assert item.num_embeddings == 300 and item.weight.shape == (150, 8)  # hashed into 300 buckets, half of them
    assert model.features.hashed == {"item": 300}
    assert model.features.tables["cate"].weight.shape == (shard_rows(21, 2, 1), 8) == (10, 8)
    assert model.features.tables["ctx"].weight.shape == (VOCAB.ctx, 8)
    assert local_fraction(model) == 0.5
    bound = (6.0 / (300 + 8)) ** 0.5  # the whole table's Xavier-uniform bound
    assert 0.9 * bound < item.weight.abs().max().item() <= bound


def _adam_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from raylsm.train.optim import build_optimizer, local_optimizer_state, whole_optimizer_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _model(seed=0)
    assert shard_tables(model, min_rows=100) == ["item"]
    opt = build_optimizer(model, 0.01, embedding_update="sparse")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for batch in _batches(4, b=8):
        _losses(ddp, opt, [{k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()}])
    whole = {"model": full_state_dict(model), "optimizer": whole_optimizer_state(model, opt)}  # collectives
    if rank == 0:
        torch.save(whole, f"{out}.whole")
    # Resume: a fresh sharded model and optimizer take this rank's rows of the whole states.
    again = _model(seed=5)
    shard_tables(again, min_rows=100)
    opt2 = build_optimizer(again, 0.01, embedding_update="sparse")
    again.load_state_dict(whole["model"])
    opt2.load_state_dict(local_optimizer_state(again, opt2, whole["optimizer"]))
    mine, theirs = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for i in mine:
        for k, v in mine[i].items():
            assert torch.equal(theirs[i][k], v), (i, k)
    dist.barrier()
    dist.destroy_process_group()


def test_two_sharded_ranks_with_row_adam_match_one_process_and_save_whole_moments(tmp_path):
    from raylsm.train.optim import build_optimizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    tmp_mp.start_processes(_adam_worker, args=(port, out), nprocs=2, start_method="spawn")
    whole = torch.load(f"{out}.whole", weights_only=True)
    one = _model(seed=0)
    opt = build_optimizer(one, 0.01, embedding_update="sparse")
    _losses(one, opt, _batches(4, b=8))
    for name, value in one.state_dict().items():
        torch.testing.assert_close(whole["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    ref = opt.state_dict()["state"]
    item = [i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            if p is one.features.tables["item"].weight][0]
    assert whole["optimizer"]["state"].keys() == ref.keys()
    got = whole["optimizer"]["state"][item]
    assert got["exp_avg"].shape == (VOCAB.item, 8)  # whole: the layout of an unsharded run
    assert float(got["step"]) == float(ref[item]["step"]) == 4.0
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(got[k], ref[item][k], rtol=1e-3, atol=1e-7, msg=k)


def test_a_whole_checkpoint_restores_into_each_sharded_rank_with_its_rows_of_the_moments(tmp_path):
    """What a sharded worker does when it resumes (``restore_checkpoint`` after ``shard_tables``): weights and
    row-wise Adam moments of the whole item table go back as this rank's rows, the rest whole, step counts kept."""
    from raylsm.train.checkpoint import restore_checkpoint, save_checkpoint
    from raylsm.train.optim import build_optimizer

    job = resolve_job(preset="lap", overrides=["train.embedding_update=sparse"])
    one = _model(seed=0)
    opt = build_optimizer(one, 0.01, embedding_update="sparse")
    _losses(one, opt, _batches(3, b=8))
    save_checkpoint(str(tmp_path), one, opt, 0, job, VOCAB, {"epoch": 0})
    whole = one.state_dict()["features.tables.item.weight"]
    index = [p is one.features.tables["item"].weight for g in opt.param_groups for p in g["params"]].index(True)
    ref = opt.state_dict()["state"][index]
    assert ref["exp_avg_sq"].abs().sum(1).gt(0).sum() > 20  # rows with moments to hand back
    for rank in range(2):
        model = _model(seed=7)
        assert shard_tables(model, min_rows=100, world=2, rank=rank) == ["item"]
        opt2 = build_optimizer(model, 0.01, embedding_update="sparse")
        assert restore_checkpoint(str(tmp_path), model, opt2, rank=rank, world_size=2, seed=0) == 1
        assert torch.equal(model.features.tables["item"].weight, whole[rank::2])
        assert torch.equal(model.state_dict()["features.tables.cate.weight"], one.state_dict()["features.tables.cate.weight"])
        got = opt2.state_dict()["state"][index]
        assert float(got["step"]) == float(ref["step"]) == 3.0
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got[k], ref[k][rank::2]), k


def test_row_sharding_needs_sparse_updates():
    with pytest.raises(ConfigError, match=r"^train.embedding_sharding: row needs train.embedding_update=sparse or auto, got dense$"):
        resolve_job(preset="lcn", overrides=["train.embedding_sharding=row", "train.embedding_update=dense"])
    # auto (the default) with row sharding is sparse, whatever the vocabulary and the worker count.
    assert resolve_job(preset="lcn", overrides=["train.embedding_sharding=row"]).train.embedding_update == "sparse"
    with pytest.raises(ConfigError, match="embedding_sharding"):
        resolve_job(preset="lcn", overrides=["train.embedding_sharding=column"])
    assert resolve_job(preset="lcn").train.embedding_sharding == "none"
