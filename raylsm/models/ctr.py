"""The CTR model: shared features -> (context encoder) -> lifelong interest -> MLP head.

Notation: B batch, S short-term length, L lifelong length, D embedding size,
P profile fields. The forward pass reads like LCN Fig. 2 / CAIN Fig. 2:

1. embed the candidate, profile, short-term and lifelong behaviours;
2. short-term interest: target attention over ``st_tgt`` and ``st_src``;
3. optional context encoder (CAIN §4.1–4.3: TCN / MSIA / PEG) whose output
   ``cr_t`` replaces the behaviour representation ``lhe_t`` (CAIN eq. 6; ``context.merge =
   replace``), is appended to it (``concat``: ``[lhe_t ‖ cr_t]``) or to the behaviour's context
   features (``context``: ``[e_c ‖ cr_t]``, read where the lifelong module reads context;
   ``context.ffn`` > 0 appends a per-behaviour feed-forward of them, ``[z_t ‖ FFN(z_t)]``);
4. lifelong interest from the registry module (``din`` ... ``lap``);
5. MLP head over ``[candidate ‖ profile ‖ short-term ‖ lifelong (‖ MSIA aux)]`` -> logits (B,).

The CRP contrastive loss (LCN §4.1) is returned as an auxiliary loss in
training mode; the trainer adds ``aux_weights[name] * aux[name]`` to the BCE
loss (LCN eq. 14).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from raylsm.models.config import ModelConfig
from raylsm.models.layers import MLP, DotTargetAttention, FeatureLayer, Vocab
from raylsm.models.registry import build_context_encoder, build_crp, build_lifelong


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device_type`` (e.g. bf16 with ``train.bf16``), else None."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):  # (meta etc. have no autocast)
        return torch.get_autocast_dtype(device_type)
    return None


# The sequences whose matches with the candidate ``match_counts`` counts: (items, cates, mask) columns.
MATCH_SEQUENCES = (("st_tgt_items", "st_tgt_cates", "st_tgt_mask"), ("st_src_items", "st_src_cates", "st_src_mask"),
                   ("ll_items", "ll_cates", "ll_mask"))


def match_counts(batch: dict[str, Tensor], sequences: int = len(MATCH_SEQUENCES)) -> Tensor:
    """log(1 + n) of the behaviours whose category, then whose item, is the candidate's, in each of the first
    ``sequences`` of :data:`MATCH_SEQUENCES`: (B, 2 * sequences).

    Read from the ids (exact, no embedding); the padding never counts (masked out).
    """
    item, cate = batch["item_id"].unsqueeze(1), batch["item_cate"].unsqueeze(1)  # (B, 1)
    counts = []
    for items, cates, mask in MATCH_SEQUENCES[:sequences]:
        m = batch[mask]  # (B, S) or (B, L)
        counts.append(((batch[cates] == cate) & m).sum(1))
        counts.append(((batch[items] == item) & m).sum(1))
    return torch.log1p(torch.stack(counts, dim=1).float())  # (B, 6)


# The item-id columns ``features.item_dropout`` drops in training (the category columns stay).
ITEM_COLUMNS = ("item_id", "st_tgt_items", "st_src_items", "ll_items")


def drop_item_ids(batch: dict[str, Tensor], p: float) -> dict[str, Tensor]:
    """``batch`` with each item id of :data:`ITEM_COLUMNS` replaced by the padding id 0 with probability ``p``."""
    out = dict(batch)
    for name in ITEM_COLUMNS:
        ids = batch[name]
        out[name] = ids.masked_fill(torch.rand(ids.shape, device=ids.device) < p, 0)
    return out


class CTRModel(nn.Module):
    """A lifelong-sequence CTR model assembled from a :class:`ModelConfig`."""

    def __init__(self, cfg: ModelConfig, vocab: Vocab):
        super().__init__()
        self.cfg = cfg
        self.features = FeatureLayer(cfg.features, vocab)
        f = self.features
        self.st_tgt_attention = DotTargetAttention(f.behaviour_dim, f.behaviour_dim, cfg.short_term_pooling)
        self.st_src_attention = DotTargetAttention(f.behaviour_dim, f.behaviour_dim, cfg.short_term_pooling)
        self.context_encoder = build_context_encoder(
            cfg, in_dim=f.context_dim + (f.behaviour_dim if cfg.context.input == "all" else 0),
            query_dim=f.behaviour_dim, profile_dim=f.profile_dim,
        )
        seq_dim, ctx_dim = f.behaviour_dim, f.context_dim
        if self.context_encoder is not None:
            merge, c = cfg.context.merge, self.context_encoder.out_dim
            seq_dim = {"replace": c, "concat": f.behaviour_dim + c, "context": f.behaviour_dim}[merge]
            ctx_dim += c if merge == "context" else 0
        self.context_ffn = None
        if self.context_encoder is not None and cfg.context.ffn:
            c = self.context_encoder.out_dim  # z_t = [e_c ‖ cr_t] -> [z_t ‖ FFN(z_t)]
            self.context_ffn = nn.Sequential(nn.Linear(ctx_dim, cfg.context.ffn), nn.ReLU(), nn.Linear(cfg.context.ffn, c))
            ctx_dim += c
        self.lifelong = build_lifelong(cfg, query_dim=f.behaviour_dim, seq_dim=seq_dim, ctx_dim=ctx_dim)
        self.crp = build_crp(cfg)
        aux_dim = self.context_encoder.aux_dim if self.context_encoder is not None else 0
        head_in = f.behaviour_dim + f.profile_dim + 2 * f.behaviour_dim + self.lifelong.out_dim + aux_dim
        head_in += 2 * f.behaviour_dim if cfg.head_products else 0
        # The sequences the count inputs read: all three, or the two short-term ones.
        self.match_sequences = len(MATCH_SEQUENCES) - (cfg.match_counts_scope == "short_term") if cfg.match_counts else 0
        head_in += 2 * self.match_sequences
        self.head = MLP(head_in, list(cfg.head), out_dim=1, dropout=cfg.head_dropout)
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.aux_weights: dict[str, float] = {"crp": cfg.crp.weight} if self.crp is not None else {}

    def _embed_retrieved(self, batch: dict[str, Tensor], dtype: torch.dtype | None, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``[e_item ‖ e_cate]`` and ``e_c`` of the lifelong behaviours at ``idx (B, K)``: (B, K, 2D) each."""
        f = self.features

        def take(name: str) -> Tensor:
            return torch.gather(batch[name], 1, idx)

        seq = f.behaviour(take("ll_items"), take("ll_cates"))
        ctx = f.context(take("ll_ctx"), take("ll_gap"))
        return (seq, ctx) if dtype is None else (seq.to(dtype), ctx.to(dtype))

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        f = self.features
        ids = batch  # the ids as they are: what the count inputs count
        if self.training and self.cfg.features.item_dropout > 0:
            batch = drop_item_ids(batch, self.cfg.features.item_dropout)
        # 1. Embeddings.
        cand = f.behaviour(batch["item_id"], batch["item_cate"])  # (B, 2D)
        profile = f.profile(batch["profile"])  # (B, P*D)
        st_tgt = f.behaviour(batch["st_tgt_items"], batch["st_tgt_cates"])  # (B, S, 2D)
        st_src = f.behaviour(batch["st_src_items"], batch["st_src_cates"])  # (B, S, 2D)
        ll_mask = batch["ll_mask"]
        lp = _autocast_dtype(ll_mask.device.type)
        # A retrieval module that reads only its K retrieved behaviours with a gradient (SIM, ETA, TWIN) gets
        # the lifelong sequence without one and embeds the retrieved ids afresh: same values and gradients,
        # and the backward touches B·K rows instead of B·L (no (B, L, 2D) gradient, no gather backward).
        gather = None
        if self.context_encoder is None and getattr(self.lifelong, "reads_retrieved_only", False):
            with torch.no_grad():
                ll = f.behaviour(batch["ll_items"], batch["ll_cates"])  # (B, L, 2D)
                ctx = f.context(batch["ll_ctx"], batch["ll_gap"])  # (B, L, 2D)
            gather = functools.partial(self._embed_retrieved, batch, lp)
        else:
            ll = f.behaviour(batch["ll_items"], batch["ll_cates"])  # (B, L, 2D)
            ctx = f.context(batch["ll_ctx"], batch["ll_gap"])  # (B, L, 2D)
        # Under autocast, cast the embeddings once here: autocast casts an fp32 activation again at
        # every matmul that reads it (the sequences 2-4 times each, forward and backward). No-op in fp32.
        st_tgt_att, st_src_att = st_tgt, st_src  # CRP keeps the fp32 embeddings (its cosines are not matmuls)
        if lp is not None:
            cand, profile, st_tgt_att, st_src_att, ll, ctx = (
                t.to(lp) for t in (cand, profile, st_tgt, st_src, ll, ctx)
            )

        # 2. Short-term interest.
        short = torch.cat(
            [
                self.st_tgt_attention(cand, st_tgt_att, batch["st_tgt_mask"]),
                self.st_src_attention(cand, st_src_att, batch["st_src_mask"]),
            ],
            dim=-1,
        )  # (B, 4D)

        # 3. Context-aware representations cr_t (CAIN eq. 6): merged as context.merge says.
        parts = [cand, profile, short]
        seq, ll_ctx = ll, ctx
        if self.context_encoder is not None:
            enc_in = torch.cat([ll, ctx], dim=-1) if self.cfg.context.input == "all" else ctx  # (B, L, 4D) or (B, L, 2D)
            cr, aux_interest = self.context_encoder(enc_in, ll_mask, cand, profile)
            merge = self.cfg.context.merge
            if merge == "replace":
                seq = cr  # (B, L, C)
            elif merge == "concat":
                seq = torch.cat([ll, cr], dim=-1)  # (B, L, 2D + C)
            else:
                ll_ctx = torch.cat([ctx, cr], dim=-1)  # (B, L, 2D + C)
                if self.context_ffn is not None:  # [z_t ‖ FFN(z_t)], z_t = [e_c ‖ cr_t]
                    ll_ctx = torch.cat([ll_ctx, self.context_ffn(ll_ctx)], dim=-1)  # (B, L, 2D + 2C)
        # 4. Lifelong interest.
        parts.append(self.lifelong(cand, seq, ll_ctx, ll_mask, gather) if gather else self.lifelong(cand, seq, ll_ctx, ll_mask))
        if self.context_encoder is not None and self.context_encoder.aux_dim:
            parts.append(aux_interest)

        if self.cfg.head_products:  # cand ⊙ short-term interests: their sums are the match scores
            parts.append(cand.unsqueeze(1).mul(short.view(short.shape[0], 2, -1)).flatten(1))  # (B, 4D)

        if self.match_sequences:
            counts = match_counts(ids, self.match_sequences).to(parts[0].dtype)  # (B, 6) or (B, 4)
            if self.training and self.cfg.match_counts_dropout > 0:  # a row's counts zeroed together
                keep = torch.rand(counts.shape[0], 1, device=counts.device) >= self.cfg.match_counts_dropout
                counts = counts * keep.to(counts.dtype)
            parts.append(counts)

        # 5. Head -> logits.
        logits = self.head(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)
        aux: dict[str, Tensor] = {}
        if self.crp is not None and self.training:
            aux["crp"] = self.crp(st_tgt, batch["st_tgt_mask"], st_src, batch["st_src_mask"], batch["user_id"])
        return logits, aux


def build_model(cfg: ModelConfig, vocab: Vocab) -> nn.Module:
    """The CTR model of ``cfg`` over ``vocab``."""
    return CTRModel(cfg, vocab)
