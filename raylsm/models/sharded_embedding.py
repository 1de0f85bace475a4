"""Row-sharded embedding tables across the ranks of a ``torch.distributed`` process group.

Rank ``r`` of ``W`` holds the rows whose id ``i`` has ``i % W == r``, at local row ``i // W``: about ``1/W``
of the table (and of its optimizer state). A lookup of ids ``(N,)``:

1. each rank sorts its ids by owner and sends every owner the local rows it needs (``all_to_all_single``
   of the counts, then of the row numbers);
2. each owner gathers those rows from its shard and sends them back (``all_to_all_single`` of (M, D) rows);
3. backward runs the reverse: each rank sends the gradient rows of its lookups to their owners, which get a
   row-sparse gradient of their own shard only, averaged over the ranks as DDP averages (no exchange of
   the table's gradient beyond the rows a batch touched, never a whole-table all-reduce).

Every rank must look up the same tables in the same order (one collective per lookup), which the
trainer's lockstep steps and evaluation batches give (Ray Train splits every dataset into equal shards).
With one process the lookups are local.

Built by hand on ``torch.distributed`` (gloo on the CPU, NCCL on GPUs) rather than on TorchRec: TorchRec's
tables train through fbgemm_gpu's table-batched embedding, whose CPU build accepts only SGD and (row-wise)
Adagrad (fbgemm-gpu-cpu 1.8.0 asserts "Optimizer adam is not supported in CPU mode", as for
``partial_row_wise_adam``), so the trainer's row-wise Adam (:class:`raylsm.train.optim.RowAdam`) could not
run on the CPU workers; and its modules take a step's ids as one ``KeyedJaggedTensor``, where the models
here look a table up several times per forward.

:func:`build_sharded_model` builds a model whose large tables are this rank's shards from the start (no
whole table is ever allocated); :func:`full_state_dict` / :func:`full_weight` assemble whole tables for a
checkpoint, which has the layout of an unsharded model's and loads on any number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn


# Tables sharded besides the item table: those of at least this many rows (ctx, gap and profile tables of a
# few rows stay whole and replicated: sharding them would add three collectives per lookup for no memory).
SHARD_MIN_ROWS = 100_000


def _group_world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shard_rows(num_embeddings: int, world: int, rank: int) -> int:
    """Rows rank ``rank`` of ``world`` holds: the ids ``i < num_embeddings`` with ``i % world == rank``."""
    return max(0, (num_embeddings - rank + world - 1) // world)


class _ShardedLookup(torch.autograd.Function):
    """Rows of the ids ``(N,)`` from their owners' shards: ``(N, D)``; the backward returns each owner's sparse gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, world: int) -> Tensor:
        owner = torch.remainder(ids, world)  # (N,)
        order = torch.argsort(owner, stable=True)  # (N,) ids grouped by owner
        send_counts = torch.bincount(owner, minlength=world)  # (W,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        wanted = ids.index_select(0, order).div(world, rounding_mode="floor")  # (N,) local rows at their owners
        local = wanted.new_empty(sum(recv))  # (M,) rows of this shard other ranks (and this one) look up
        dist.all_to_all_single(local, wanted, output_split_sizes=recv, input_split_sizes=send)
        rows = weight.index_select(0, local)  # (M, D)
        back = rows.new_empty(ids.shape[0], weight.shape[1])  # (N, D) in owner order
        dist.all_to_all_single(back, rows, output_split_sizes=send, input_split_sizes=recv)
        ctx.save_for_backward(ids, order, local)
        ctx.splits = (send, recv)
        ctx.world, ctx.shape = world, tuple(weight.shape)
        return back.new_empty(back.shape).index_copy_(0, order, back)  # (N, D) in the ids' order

    @staticmethod
    def backward(ctx, grad: Tensor):
        ids, order, local = ctx.saved_tensors
        send, recv = ctx.splits
        g = grad.index_select(0, order)  # (N, D) in owner order
        g = g.masked_fill((ids.index_select(0, order) == 0).unsqueeze(1), 0.0)  # padding_idx = 0
        got = g.new_empty(local.shape[0], g.shape[1])  # (M, D) gradient rows of this shard
        dist.all_to_all_single(got, g.contiguous(), output_split_sizes=recv, input_split_sizes=send)
        got = got / ctx.world  # the mean over ranks, as DDP's all-reduce gives the dense parameters
        grad_weight = torch.sparse_coo_tensor(local.unsqueeze(0), got, ctx.shape, check_invariants=False)
        return grad_weight, None, None


class RowShardedEmbedding(nn.Module):
    """An embedding table of ``num_embeddings`` rows of which this rank holds ``id % world == rank`` (padding id 0).

    ``weight`` is the local shard, ``(shard_rows(num_embeddings, world, rank), D)``: its gradient is row-sparse
    and already complete (every rank's lookups of these rows), so it is neither all-reduced nor exchanged.
    """

    sharded = True
    sparse = True  # row-sparse gradients (raylsm.models.layers.embed routes lookups here)

    def __init__(self, num_embeddings: int, embedding_dim: int, world: int | None = None, rank: int | None = None,
                 init: str = "xavier", std: float = 0.01, weight: Tensor | None = None):
        super().__init__()
        w, r = _group_world_rank()
        self.world, self.rank = world or w, r if rank is None else rank
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = 0
        rows = shard_rows(num_embeddings, self.world, self.rank)
        if weight is None:
            weight = torch.empty(rows, embedding_dim)
            if init == "xavier":  # the bound of the whole table's Xavier-uniform init: the same distribution
                bound = math.sqrt(6.0 / (num_embeddings + embedding_dim))
                nn.init.uniform_(weight, -bound, bound)
            else:
                nn.init.normal_(weight, std=std)
            if self.rank == 0 and rows:
                with torch.no_grad():
                    weight[0].zero_()  # id 0 = padding, local row 0 of rank 0
        self.weight = nn.Parameter(weight)
        self.register_load_state_dict_pre_hook(_load_whole_weight)

    @classmethod
    def from_table(cls, table: nn.Embedding, world: int | None = None, rank: int | None = None) -> "RowShardedEmbedding":
        """This rank's rows of a whole ``nn.Embedding`` (same values as the table at every id)."""
        w, r = _group_world_rank()
        world, rank = world or w, r if rank is None else rank
        full = table.weight.detach()
        return cls(full.shape[0], full.shape[1], world, rank, weight=full[rank::world].clone())

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)  # (N,)
        if self.world == 1:
            out = _local_lookup(self.weight, flat)
        else:
            out = _ShardedLookup.apply(self.weight, flat, self.world)
        return out.view(*ids.shape, self.embedding_dim)  # (..., D)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows {self.weight.shape[0]} on rank {self.rank}/{self.world}"


def _local_lookup(weight: Tensor, ids: Tensor) -> Tensor:
    from raylsm.models.sparse_embedding import SparseRowsEmbedding

    if weight.requires_grad and torch.is_grad_enabled():
        return SparseRowsEmbedding.apply(weight, ids)
    return weight.index_select(0, ids)


def shard_tables(model: nn.Module, min_rows: int = 0, world: int | None = None, rank: int | None = None) -> list[str]:
    """Replace every table of ``model.features`` with at least ``min_rows`` rows by this rank's row shard; their names."""
    tables = model.features.tables
    done = []
    for name in list(tables.keys()):
        table = tables[name]
        if isinstance(table, nn.Embedding) and table.weight.shape[0] >= min_rows:
            tables[name] = RowShardedEmbedding.from_table(table, world, rank)
            done.append(name)
    return done


def full_weight(table: RowShardedEmbedding, shard: Tensor | None = None) -> Tensor:
    """The whole table ``(num_embeddings, D)`` assembled from every rank's shard (a collective: all ranks call it).

    ``shard`` (default: the table's weight) may be any tensor laid out like it, e.g. an optimizer moment.
    """
    local = (table.weight if shard is None else shard).detach()
    n, w = table.num_embeddings, table.world
    if w == 1:
        return local.clone()
    longest = shard_rows(n, w, 0)
    padded = local.new_zeros(longest, local.shape[1])  # (R, D): shards differ by at most one row
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    whole = local.new_empty(n, local.shape[1])  # (V, D)
    for r in range(w):
        whole[r::w] = parts[r][: shard_rows(n, w, r)]
    return whole


def local_rows(table: RowShardedEmbedding, whole: Tensor) -> Tensor:
    """This rank's rows of a whole-table tensor ``(num_embeddings, D)`` (a checkpoint's weight or moment)."""
    return whole[table.rank::table.world].clone()


def _load_whole_weight(module: RowShardedEmbedding, state_dict: dict, prefix: str, *_args) -> None:
    """Load-state pre-hook: a whole table in ``state_dict`` (any checkpoint layout) becomes this rank's rows."""
    key = prefix + "weight"
    value = state_dict.get(key)
    if isinstance(value, Tensor) and value.shape[0] == module.num_embeddings != module.weight.shape[0]:
        state_dict[key] = local_rows(module, value)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every row-sharded table whole (a collective: all ranks call it).

    The layout of an unsharded model's state: it loads into a model with any number of shards (each rank
    takes its rows) or none, e.g. the one-process model of the serving path.
    """
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, RowShardedEmbedding):
            state[f"{name}.weight" if name else "weight"] = full_weight(module)
    return state


def build_sharded_model(cfg, vocab, world: int | None = None, rank: int | None = None,
                        min_rows: int = SHARD_MIN_ROWS) -> tuple[nn.Module, list[str]]:
    """``build_model(cfg, vocab)`` with the item table, and every table of at least ``min_rows`` rows, row-sharded.

    The sharded tables are built as this rank's shard only (the whole-table Xavier / normal init
    distribution): a table's sizes (and hash buckets, ``features.hash_buckets``) come from a build on the
    meta device, the real build gets two-row stand-ins for those id spaces, which the shards then replace.
    Returns the model and the sharded tables' names.
    """
    from raylsm.models.ctr import build_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        whole = build_model(cfg, vocab).features
    sizes = {name: t.weight.shape[0] for name, t in whole.tables.items()}
    names = [name for name, rows in sizes.items() if name == "item" or rows >= min_rows]
    plain = {k: 2 for k in ("item", "cate", "ctx", "gap") if k in names}
    profile = {k: 2 if f"profile_{k}" in names else v for k, v in vocab.profile.items()}
    model = build_model(cfg, replace(vocab, **plain, profile=profile))
    model.features.hashed = dict(whole.hashed)  # the stand-ins are too small to be hashed; the shards are not
    for name in names:
        model.features.tables[name] = RowShardedEmbedding(sizes[name], cfg.features.emb_dim, world, rank,
                                                          init=cfg.features.emb_init, std=cfg.features.emb_std)
    return model, names


def local_fraction(model: nn.Module, name: str = "item") -> float:
    """The share of table ``name``'s rows this process's own tensor holds (1.0 for a whole table)."""
    table = model.features.tables[name]
    return table.weight.shape[0] / getattr(table, "num_embeddings", table.weight.shape[0])
