"""Row-sparse embedding updates (``train.embedding_update = sparse``): same model, same updates where they must be.

* plain SGD: dense and sparse give the same loss curve and weights (float tolerance);
* Adam: the first step is the same; rows no batch touched never change under sparse;
* the combined optimizer's state saves and restores through the project's checkpoints;
* two gloo workers: tables are left out of DDP, start from rank 0's rows, and their exchanged sparse
  gradients give the update of one process over both halves of the batch.

Two sparse Ray Train workers training, checkpointing and resuming: the two-worker run of
``tests/test_train_ray.py``.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as tmp_mp

from raylsm.config import ConfigError
from raylsm.models.ctr import build_model
from raylsm.models.registry import preset_config
from raylsm.models.layers import Vocab
from raylsm.train.config import resolve_job
from raylsm.train.checkpoint import restore_checkpoint, save_checkpoint
from raylsm.train.optim import build_optimizer
from raylsm.train.step import train_epoch
from raylsm.train.optim import RowSparseOptimizer, embedding_tables, split_parameters
from tests.conftest import make_batch

VOCAB = Vocab(item=500, cate=21, ctx=6, gap=10, user=31, profile={"age": 5, "gender": 3})
# item_dropout 0: these compare runs row by row (the lap preset drops item ids in training)
TINY = {"features": {"emb_dim": 8, "item_dropout": 0.0}, "head": [16], "lap": {"k1": 8, "k2": 4, "att_dim": 8, "heads": 2, "ffn_dim": 16}}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(preset_config("lap", TINY), VOCAB)


def _batches(n: int, b: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [make_batch(b=b, s=4, l=12, vocab=VOCAB, seed=seed + i) for i in range(n)]


def _losses(model, opt, batches) -> list[float]:
    """The training loss of each step (one step per batch)."""
    return [train_epoch(model, opt, [b], torch.device("cpu")).train_loss for b in batches]


def _sgd(model, lr: float, sparse: bool):
    if not sparse:
        return torch.optim.SGD(model.parameters(), lr=lr)
    dense, tables = split_parameters(model, sparse_tables=True)
    return RowSparseOptimizer(torch.optim.SGD(dense, lr=lr), torch.optim.SGD(tables, lr=lr))


def test_sgd_dense_and_sparse_give_the_same_loss_curve():
    batches = _batches(6)
    dense, sparse = _model(), _model()
    curve_dense = _losses(dense, _sgd(dense, 0.5, False), batches)
    curve_sparse = _losses(sparse, _sgd(sparse, 0.5, True), batches)
    assert all(t.weight.grad is None or t.weight.grad.is_sparse for _, t in embedding_tables(sparse))
    assert curve_dense[0] != curve_dense[-1]  # it trained
    torch.testing.assert_close(torch.tensor(curve_sparse), torch.tensor(curve_dense), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(dense.state_dict().items(), sparse.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_adam_first_step_identical_and_untouched_rows_never_change():
    batches = _batches(4, b=4)
    dense, sparse = _model(), _model()
    init = copy.deepcopy(sparse.state_dict())
    opt_d = build_optimizer(dense, 1e-2, True, "dense")
    opt_s = build_optimizer(sparse, 1e-2, True, "sparse")
    assert isinstance(opt_s, RowSparseOptimizer) and isinstance(opt_d, torch.optim.Adam)
    _losses(dense, opt_d, batches[:1])
    _losses(sparse, opt_s, batches[:1])
    for (name, a), b in zip(dense.state_dict().items(), sparse.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    _losses(dense, opt_d, batches[1:-1])
    _losses(sparse, opt_s, batches[1:-1])
    before_s = sparse.features.tables["item"].weight.detach().clone()
    before_d = dense.features.tables["item"].weight.detach().clone()
    _losses(dense, opt_d, batches[-1:])
    _losses(sparse, opt_s, batches[-1:])

    def touched(chosen: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        ids = torch.cat([torch.cat([b["item_id"], b["st_tgt_items"].flatten(), b["st_src_items"].flatten(),
                                    b["ll_items"].flatten()]) for b in chosen])
        mask = torch.zeros(VOCAB.item, dtype=torch.bool)
        mask[ids] = True
        mask[0] = False  # padding: never updated
        return mask

    ever, last = touched(batches), touched(batches[-1:])
    w0 = init["features.tables.item.weight"]
    ws, wd = sparse.features.tables["item"].weight.detach(), dense.features.tables["item"].weight.detach()
    assert (~ever).sum() > 100 and last.sum() > 20
    assert torch.equal(ws[~ever], w0[~ever])  # never touched: never changed
    assert torch.equal(ws[~last], before_s[~last])  # lazy: the last step moved only the rows it touched
    assert (ws[last] != before_s[last]).any(1).all()
    earlier = ever & ~last  # touched before, not by the last batch: dense Adam still moves them (momentum)
    assert earlier.sum() > 10 and (wd[earlier] != before_d[earlier]).any(1).all()
    assert torch.equal(ws[0], torch.zeros_like(ws[0]))  # the padding row stays zero


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_weight_decay_is_decoupled_and_lazy_on_row_sparse_tables(weight_decay):
    """``train.weight_decay`` (AdamW's): the touched rows take the same first step dense and sparse; a row no
    batch touched shrinks by (1 - lr·wd) under dense Adam and keeps its value under sparse; off, it never moves."""
    lr = 1e-2
    batch = _batches(1, b=4)
    dense, sparse = _model(), _model()
    w0 = dense.features.tables["item"].weight.detach().clone()
    _losses(dense, build_optimizer(dense, lr, True, "dense", weight_decay), batch)
    _losses(sparse, build_optimizer(sparse, lr, True, "sparse", weight_decay), batch)
    b = batch[0]
    touched = torch.zeros(VOCAB.item, dtype=torch.bool)
    touched[torch.cat([b["item_id"], b["st_tgt_items"].flatten(), b["st_src_items"].flatten(),
                       b["ll_items"].flatten()])] = True
    untouched = ~touched
    untouched[0] = False  # padding
    wd, ws = dense.features.tables["item"].weight.detach(), sparse.features.tables["item"].weight.detach()
    torch.testing.assert_close(ws[touched], wd[touched], rtol=1e-5, atol=1e-7)
    assert torch.equal(ws[untouched], w0[untouched])
    torch.testing.assert_close(wd[untouched], w0[untouched] * (1 - lr * weight_decay), rtol=1e-6, atol=0.0)
    assert torch.equal(wd[untouched], w0[untouched]) == (weight_decay == 0)


def test_sparse_optimizer_checkpoint_saves_and_restores(tmp_path):
    job = resolve_job(preset="lap", overrides=["train.embedding_update=sparse"])
    batches = _batches(3)
    model = _model()
    opt = build_optimizer(model, 1e-2, True, job.train.embedding_update)
    _losses(model, opt, batches[:2])
    save_checkpoint(str(tmp_path), model, opt, 0, job, VOCAB, {"epoch": 0})
    saved = opt.state_dict()
    assert set(saved) == {"state", "param_groups"} and len(saved["param_groups"]) == 2
    assert sorted(saved["state"]) == list(range(sum(1 for _ in model.parameters())))

    fresh = _model(seed=5)
    fresh_opt = build_optimizer(fresh, 1e-2, True, "sparse")
    assert restore_checkpoint(str(tmp_path), fresh, fresh_opt) == 1
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    restored = fresh_opt.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    for idx, st in saved["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(restored["state"][idx][key]), torch.as_tensor(value)), (idx, key)
    # Continuing from the restored state is the same as continuing the original.
    _losses(model, opt, batches[2:])
    _losses(fresh, fresh_opt, batches[2:])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="train.embedding_update"):  # a dense-mode optimizer state
        fresh_opt.load_state_dict(torch.optim.Adam(fresh.parameters()).state_dict())


def test_bad_embedding_update_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^train\.embedding_update: must be one of \['auto', 'dense', 'sparse'\]"):
        resolve_job(preset="lap", overrides=["train.embedding_update=rows"])
    assert resolve_job(preset="lap").train.embedding_update == "auto"


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _model(seed=rank)  # different tables per rank: the first forward must bring rank 0's
    opt = _sgd(model, 0.5, sparse=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    names = {f"{n}.weight" for n, _ in embedding_tables(model)}
    assert names and names <= set(ddp.parameters_to_ignore)
    for step, batch in enumerate(_batches(3, b=8)):
        half = {k: v[rank * 4:(rank + 1) * 4] for k, v in batch.items()}  # (4, ...): this rank's half
        train_epoch(ddp, opt, [half], torch.device("cpu"))
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.barrier()
    dist.destroy_process_group()


def test_two_workers_exchange_table_rows_and_match_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    tmp_mp.start_processes(_ddp_worker, args=(port, out), nprocs=2, start_method="spawn")
    two = torch.load(out, weights_only=True)
    one = _model(seed=0)
    _losses(one, _sgd(one, 0.5, sparse=False), _batches(3, b=8))  # the whole batch, one process, dense
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6, msg=name)


JOB_TINY = ["model.features.item_dropout=0", "data.ll_len=12", "data.st_len=4", "model.features.emb_dim=8", "model.head=[16]", "model.lap.k1=8",
            "model.lap.k2=4", "model.lap.att_dim=8", "model.lap.heads=2", "model.lap.ffn_dim=16", "model.crp.m=16"]


@pytest.mark.parametrize("preset", sorted(__import__("raylsm.models.config", fromlist=["PRESETS"]).PRESETS))
def test_every_preset_takes_the_same_sgd_steps_dense_and_sparse(preset):
    cfg = resolve_job(preset=preset, overrides=JOB_TINY).model
    batches = _batches(2)
    weights = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB)
        opt = _sgd(model, 0.5, sparse)
        torch.manual_seed(1)  # the same draws (CRP samples, dropout) in both runs
        _losses(model, opt, batches)
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6, msg=f"{preset}: {name}")


@pytest.mark.ray
def test_auto_is_dense_for_small_tables_and_sparse_from_a_hundred_thousand_rows():
    from raylsm.models.sharded_embedding import SHARD_MIN_ROWS
    from raylsm.train.optim import resolve_embedding_update

    cfg = preset_config("lap", {"features": {"emb_dim": 4}, "head": [8], "lap": {"k1": 4, "k2": 2}})
    small = build_model(cfg, Vocab(item=1000, cate=20, ctx=5, gap=10, user=10, profile={}))
    large = build_model(cfg, Vocab(item=SHARD_MIN_ROWS, cate=20, ctx=5, gap=10, user=10, profile={}))
    assert resolve_embedding_update(small, "auto") == "dense" and resolve_embedding_update(large, "auto") == "sparse"
    assert resolve_embedding_update(large, "dense") == "dense" and resolve_embedding_update(small, "sparse") == "sparse"
    assert type(build_optimizer(small, 1e-3, True, "auto")) is torch.optim.Adam  # exactly the dense path
    opt = build_optimizer(large, 1e-3, True, "auto")
    assert isinstance(opt, RowSparseOptimizer)
    assert all(t.sparse for _, t in embedding_tables(large)) and not any(t.sparse for _, t in embedding_tables(small))
    assert resolve_job(preset="lap").train.embedding_update == "auto"
