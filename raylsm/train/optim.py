"""Optimizers of the trainer: Adam over every parameter, or row-sparse updates of the embedding tables.

``train.embedding_update``:

``dense``
    One ``torch.optim.Adam`` over all parameters. Every step each table gets a dense gradient of its
    full size, Adam reads and writes every row, and DDP all-reduces the whole table gradient: a step's
    cost grows with the vocabulary.
``sparse``
    The tables produce row-sparse gradients (``nn.Embedding.sparse``: the (ids, rows) a batch touched),
    :class:`RowAdam` (Adam's update, on the touched rows only) updates only those rows,
    ``torch.optim.Adam`` the dense parameters.
    Under DDP the tables are left out of DDP (only the dense parameters are all-reduced) and their
    sparse gradients are exchanged as (indices, values) with ``torch.distributed.all_gather``, then
    averaged like DDP averages. A step's cost follows the rows it touched, not the vocabulary.

Row-sharded tables (``train.embedding_sharding = row``, :mod:`raylsm.models.sharded_embedding`) go to
:class:`RowAdam` with the other tables but are not exchanged: each rank's shard already receives every
rank's gradient rows for its ids. :func:`whole_optimizer_state` / :func:`local_optimizer_state` turn their
moments into whole tables for a checkpoint and back into this rank's rows on restore.

Both return an object the loop uses as one optimizer (``zero_grad``, ``step``, ``state``,
``state_dict``/``load_state_dict`` in the usual ``{"state", "param_groups"}`` layout), so
checkpoints save and restore as before. With plain SGD (no momentum) both give the same updates;
with Adam the first step is the same and later ones differ where a row was not touched (row-wise Adam
is "lazy": an untouched row keeps its value, where Adam keeps moving it with its momentum).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from raylsm.models.sparse_embedding import RowScratch, unique_rows

EmbeddingUpdate = Literal["auto", "dense", "sparse"]


def embedding_tables(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """Every ``nn.Embedding`` of ``model`` that trains, with its qualified module name, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and m.weight.requires_grad]


def sparse_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(ids (N,), rows (N, D)) of a row-sparse gradient, coalesced or not (ids may repeat)."""
    return grad._indices()[0], grad._values()


def sharded_tables(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every row-sharded table of ``model`` (:mod:`raylsm.models.sharded_embedding`), with its module name."""
    return [(name, m) for name, m in model.named_modules() if getattr(m, "sharded", False)]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast_tables_once(module: nn.Module, _args: Any) -> None:
    """Forward pre-hook: rank 0's tables to every rank, before the first forward (DDP skips ignored parameters)."""
    handle = module.__dict__.pop("_raylsm_table_sync", None)
    if handle is not None:
        handle.remove()
    if _world() > 1:
        with torch.no_grad():
            for _, table in embedding_tables(module):
                dist.broadcast(table.weight.data, src=0)


def use_sparse_gradients(model: nn.Module) -> list[nn.Parameter]:
    """Switch ``model``'s tables to row-sparse gradients and leave them out of DDP; returns their weights.

    The tables' qualified parameter names are registered with DDP's ignore list (read when DDP wraps the
    model), so DDP neither all-reduces nor broadcasts them; a one-shot forward pre-hook broadcasts rank 0's
    tables once instead, so every rank starts from the same rows (as DDP does for its own parameters).
    """
    tables = embedding_tables(model)
    for _, table in tables:
        table.sparse = True
    names = [f"{name}.weight" for name, _ in tables + sharded_tables(model)]  # a shard is its rank's own
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(names)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))
    if "_raylsm_table_sync" not in model.__dict__:
        model.__dict__["_raylsm_table_sync"] = model.register_forward_pre_hook(_broadcast_tables_once)
    return [table.weight for _, table in tables]


def exchange_sparse_grads(params: list[nn.Parameter], scratch: RowScratch) -> None:
    """Average the row-sparse gradients of ``params`` over the process group (no-op on one process).

    Each rank sums its gradients' rows per id (:func:`unique_rows`, ``scratch`` its per-table scratch), then three ``all_gather`` calls carry
    every rank's per-table row counts, ids and rows (padded to the longest rank); each rank rebuilds
    the same gradient: the concatenation of all ranks' rows divided by the world size (uncoalesced:
    the row-wise optimizer sums duplicate ids). All ranks must call it with the same ``params``.
    """
    world = _world()
    if world == 1 or not params:
        return
    dim = params[0].shape[1]
    dtype, device = params[0].dtype, params[0].device
    ids: list[Tensor] = []
    rows: list[Tensor] = []
    for p in params:
        if p.grad is None:
            ids.append(torch.zeros(0, dtype=torch.long, device=device))
            rows.append(torch.zeros(0, dim, dtype=dtype, device=device))
        else:
            i, v = unique_rows(*sparse_rows(p.grad), scratch.get(p))  # one row per touched id: less to send
            ids.append(i)
            rows.append(v)
    counts = torch.tensor([len(i) for i in ids], dtype=torch.long, device=device)  # (T,)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    per_rank = torch.stack(all_counts)  # (W, T)
    longest = int(per_rank.sum(1).max())
    flat_ids = torch.zeros(longest, dtype=torch.long, device=device)  # (N,)
    flat_rows = torch.zeros(longest, dim, dtype=dtype, device=device)  # (N, D)
    mine = int(counts.sum())
    if mine:
        flat_ids[:mine] = torch.cat(ids)
        flat_rows[:mine] = torch.cat(rows)
    got_ids = [torch.empty_like(flat_ids) for _ in range(world)]
    got_rows = [torch.empty_like(flat_rows) for _ in range(world)]
    dist.all_gather(got_ids, flat_ids)
    dist.all_gather(got_rows, flat_rows)
    splits = per_rank.tolist()
    parts_ids: list[list[Tensor]] = [[] for _ in params]
    parts_rows: list[list[Tensor]] = [[] for _ in params]
    for r in range(world):
        for t, (i, v) in enumerate(zip(got_ids[r][: sum(splits[r])].split(splits[r]),
                                       got_rows[r][: sum(splits[r])].split(splits[r]))):
            parts_ids[t].append(i)
            parts_rows[t].append(v)
    for t, p in enumerate(params):
        if not int(per_rank[:, t].sum()):
            p.grad = None
            continue
        index = torch.cat(parts_ids[t]).unsqueeze(0)  # (1, N_t)
        values = torch.cat(parts_rows[t]) / world  # (N_t, D)
        p.grad = torch.sparse_coo_tensor(index, values, p.shape, check_invariants=False)


def _adam_rows(rows: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float, beta1: float, beta2: float,
               eps: float) -> None:
    """Adam's update of gathered rows in place (``rows``, ``m``, ``v``: (N, D)); ``step`` already counts this step.

    PyTorch's fused Adam kernel on the CPU/CUDA (one pass, the same arithmetic as ``Adam(fused=True)``),
    else Adam's single-tensor formula.
    """
    fused = getattr(torch, "_fused_adam_", None)
    if fused is not None and rows.device.type in ("cpu", "cuda"):
        fused([rows], [g], [m], [v], [], [step], lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
              amsgrad=False, maximize=False)
        return
    t = float(step)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
    rows.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


class RowAdam(torch.optim.Optimizer):
    """Adam on the rows a row-sparse gradient touched; the other rows, and their moments, are left as they are.

    For a touched row the update is ``torch.optim.Adam``'s (``m = lerp(m, g, 1-β1)``, ``v = β2 v + (1-β2) g²``,
    ``p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)``, ``t`` = the table's step count; computed by Adam's
    fused kernel on the gathered rows), so the first step equals Adam's on every row.
    (``torch.optim.SparseAdam`` adds ``eps`` before the bias correction, which differs from Adam for rows
    with small gradients.) Cost per step: the rows of each id summed (:func:`unique_rows`), the distinct
    ids sorted (the gathers and scatters then walk the tables in order), three gathers, one fused pass,
    three scatters: O(rows touched), not O(vocabulary).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.scratch = RowScratch()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowAdam takes row-sparse gradients (nn.Embedding(sparse=True)); use Adam")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                # Counted for every gradient, even one of no rows (a row shard none of whose ids a step looked up),
                # so every shard of a table keeps the step count the whole table would have.
                state["step"] += 1
                idx, g = unique_rows(*sparse_rows(p.grad), self.scratch.get(p))  # (N,), (N, D): one row per id
                if idx.numel() == 0:
                    continue
                idx, order = idx.sort()  # ascending rows: the gathers and scatters below walk memory in order
                g = g.index_select(0, order)
                rows = p.index_select(0, idx)  # (N, D)
                m = state["exp_avg"].index_select(0, idx)  # (N, D)
                v = state["exp_avg_sq"].index_select(0, idx)  # (N, D)
                if group.get("weight_decay", 0.0):  # decoupled (AdamW), on the touched rows only
                    rows.mul_(1.0 - group["lr"] * group["weight_decay"])
                _adam_rows(rows, g, m, v, state["step"], group["lr"], beta1, beta2, group["eps"])
                p.index_copy_(0, idx, rows)
                state["exp_avg"].index_copy_(0, idx, m)
                state["exp_avg_sq"].index_copy_(0, idx, v)
        return loss


class RowSparseOptimizer:
    """One optimizer made of ``dense`` (the dense parameters) and ``sparse`` (the tables' row-sparse gradients).

    ``step`` first exchanges the tables' gradients over the process group (:func:`exchange_sparse_grads`),
    then steps both. ``state_dict`` is the usual layout: the dense optimizer's groups and state first, the
    sparse one's after them (parameter indices continue), so a checkpoint holds one plain optimizer state.
    """

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer,
                 local: list[nn.Parameter] | None = None):
        self.dense, self.sparse = dense, sparse
        mine = {id(p) for p in local or []}  # row shards: their gradient is already every rank's, not exchanged
        self.tables: list[nn.Parameter] = [p for g in sparse.param_groups for p in g["params"] if id(p) not in mine]
        self.scratch = getattr(sparse, "scratch", None) or RowScratch()

    @property
    def param_groups(self) -> list[dict]:
        return self.dense.param_groups + self.sparse.param_groups

    @property
    def state(self) -> dict:
        """Per-parameter state of both optimizers (the same inner dicts: editing them edits the optimizers')."""
        return {**self.dense.state, **self.sparse.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        exchange_sparse_grads(self.tables, self.scratch)
        self.dense.step()
        self.sparse.step()
        return loss

    def _count(self) -> int:
        return sum(len(g["params"]) for g in self.dense.param_groups)

    def state_dict(self) -> dict:
        d, s = self.dense.state_dict(), self.sparse.state_dict()
        offset = self._count()
        groups = list(d["param_groups"]) + [{**g, "params": [i + offset for i in g["params"]]} for g in s["param_groups"]]
        state = dict(d["state"]) | {i + offset: v for i, v in s["state"].items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        n_dense = len(self.dense.param_groups)
        if len(groups) != n_dense + len(self.sparse.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter group(s), expected {n_dense} dense + "
                             f"{len(self.sparse.param_groups)} sparse: written with another train.embedding_update")
        offset = self._count()
        state = state_dict["state"]
        self.dense.load_state_dict({"state": {i: v for i, v in state.items() if int(i) < offset},
                                    "param_groups": groups[:n_dense]})
        self.sparse.load_state_dict({"state": {int(i) - offset: v for i, v in state.items() if int(i) >= offset},
                                     "param_groups": [{**g, "params": [i - offset for i in g["params"]]}
                                                      for g in groups[n_dense:]]})


def _param_indices(optimizer) -> dict[int, int]:
    """``id(param)`` -> its index in ``optimizer.state_dict()`` (parameters numbered through the groups in order)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {id(p): i for i, p in enumerate(params)}


def _sharded_states(model: nn.Module, optimizer, state: dict) -> list[tuple[nn.Module, dict]]:
    """(sharded table, its entry of ``state``) for every row-sharded table the optimizer has state for."""
    index = _param_indices(optimizer)
    out = []
    for _, table in sharded_tables(model):
        i = index.get(id(table.weight))
        entry = state.get(i, state.get(str(i))) if i is not None else None
        if entry is not None:
            out.append((table, entry))
    return out


def whole_optimizer_state(model: nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()`` with the row-wise moments of every row-sharded table whole (a collective).

    The layout an unsharded run's optimizer writes (``exp_avg``/``exp_avg_sq`` of ``(num_embeddings, D)``), so a
    checkpoint resumes on any number of workers. Every rank must call it (one ``all_gather`` per moment).
    """
    from raylsm.models.sharded_embedding import full_weight

    sd = optimizer.state_dict()
    tables = _sharded_states(model, optimizer, sd["state"])
    if not tables:
        return sd
    state = dict(sd["state"])
    index = _param_indices(optimizer)
    for table, entry in tables:
        whole = {k: full_weight(table, v) if isinstance(v, Tensor) and v.dim() == 2 else v for k, v in entry.items()}
        state[index[id(table.weight)]] = whole
    return {"state": state, "param_groups": sd["param_groups"]}


def local_optimizer_state(model: nn.Module, optimizer, state_dict: dict) -> dict:
    """A whole-table optimizer state (:func:`whole_optimizer_state`, or an unsharded run's) with this rank's rows
    of every row-sharded table's moments, ready for ``optimizer.load_state_dict``."""
    from raylsm.models.sharded_embedding import local_rows

    tables = _sharded_states(model, optimizer, state_dict["state"])
    if not tables:
        return state_dict
    state = dict(state_dict["state"])
    index = _param_indices(optimizer)
    for table, entry in tables:
        key = index[id(table.weight)] if index[id(table.weight)] in state else str(index[id(table.weight)])
        state[key] = {k: local_rows(table, v) if isinstance(v, Tensor) and v.dim() == 2 and v.shape[0] == table.num_embeddings
                      != table.weight.shape[0] else v for k, v in entry.items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def split_parameters(model: nn.Module, sparse_tables: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense parameters, table weights) of ``model``; with ``sparse_tables`` the tables switch to sparse gradients.

    The tables, row-sharded ones included, in module order: a sharded model's optimizer numbers its parameters
    as the unsharded model's does, so their checkpoints share one optimizer layout.
    """
    if sparse_tables:
        use_sparse_gradients(model)
    tables = [m.weight for _, m in model.named_modules()
              if (isinstance(m, nn.Embedding) and m.weight.requires_grad) or getattr(m, "sharded", False)]
    ids = {id(p) for p in tables}
    return [p for p in model.parameters() if id(p) not in ids], tables


def resolve_embedding_update(model: nn.Module, embedding_update: EmbeddingUpdate) -> Literal["dense", "sparse"]:
    """``auto`` -> ``sparse`` when ``model`` has a row-sharded table or one of ``SHARD_MIN_ROWS``+ rows (where a
    whole-table Adam step and all-reduce dominate the step), else ``dense``; ``dense``/``sparse`` as given."""
    if embedding_update != "auto":
        return embedding_update
    from raylsm.models.sharded_embedding import SHARD_MIN_ROWS

    large = any(t.num_embeddings >= SHARD_MIN_ROWS for _, t in embedding_tables(model))
    return "sparse" if large or sharded_tables(model) else "dense"


def _decay(weight_decay: float) -> dict:
    """Adam's keywords for decoupled weight decay (AdamW's); none at 0, so the update is plain Adam's kernel."""
    return {"weight_decay": weight_decay, "decoupled_weight_decay": True} if weight_decay else {}


def build_optimizer(model: nn.Module, lr: float, fused: bool = True, embedding_update: EmbeddingUpdate = "dense",
                    weight_decay: float = 0.0) -> torch.optim.Optimizer | RowSparseOptimizer:
    """The optimizer of ``model`` for ``train.embedding_update``; ``fused`` = Adam's fused kernel (``train.fused_adam``).

    ``dense``: Adam over every parameter (the fused kernel computes the same update as the default
    per-parameter loop, in one pass over each tensor; on the CPU the loop is 7x slower for the tables).
    ``sparse``: switches ``model``'s tables to row-sparse gradients (see :func:`use_sparse_gradients`;
    call it before DDP wraps the model) and returns a :class:`RowSparseOptimizer` of Adam (dense
    parameters) and :class:`RowAdam` (tables) with the same learning rate, betas and eps. ``auto``: one of
    the two by the tables' size (:func:`resolve_embedding_update`). ``weight_decay``: decoupled, as AdamW's
    (``train.weight_decay``; on the touched rows only for row-sparse tables).
    """
    embedding_update = resolve_embedding_update(model, embedding_update)
    if embedding_update == "dense":
        if sharded_tables(model):
            raise ValueError("train.embedding_sharding: row-sharded tables need train.embedding_update=sparse")
        return torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None, **_decay(weight_decay))
    if embedding_update != "sparse":
        raise ValueError(f"train.embedding_update: must be one of ['auto', 'dense', 'sparse'], got {embedding_update!r}")
    dense, tables = split_parameters(model, sparse_tables=True)
    return RowSparseOptimizer(torch.optim.Adam(dense, lr=lr, fused=fused or None, **_decay(weight_decay)),
                              RowAdam(tables, lr=lr, weight_decay=weight_decay),
                              local=[t.weight for _, t in sharded_tables(model)])
