"""CAIN context encoder (CAIN §4.1–4.3): TCN / GRU / self-attention, MSIA, PEG.

Notation (as in the paper where it has one):
    B  batch size             L  lifelong length (left-padded: most recent at the right)
    C_in  input size = ``in_dim`` (the behaviour representation ``[e_item ‖ e_cate ‖ e_c]``, 4D)
    C  output size ``out_dim`` (``context.out_dim``, 0 = C_in)
    n  MSIA layer (1 = the context TCN), k_n = 2·cl_n + 1 its kernel, s_n its stride,
    L_n its output length, J_n = s_1⋯s_n its jump (input items between adjacent outputs)
    P  profile size, h  PEG hidden size (O_n, eq. 10), d  auxiliary attention size (eq. 8)

The encoder maps ``(seq (B, L, C_in), mask (B, L), cand (B, Dq), profile (B, P))`` to
``cr (B, L, C)`` (the context-aware representations ``cr_t`` that replace ``lhe_t``, eq. 6)
and ``aux (B, aux_dim)`` = ``[IR_2 ‖ … ‖ IR_n]`` (eq. 9; a (B, 0) tensor without MSIA).

Readings where the paper leaves room (docs/design.md, "Models and readings"):

* Padding. The input is zeroed at padded positions (``torch.where``, so even NaN garbage
  vanishes) and every layer's output is zeroed where its mask is False. For a left-padded
  sequence the conv's left zero padding then *is* eq. 5's zero padding of the first real items.
* Window anchoring. A layer of stride s has ``L_n = ceil(L_{n-1} / s)`` outputs (the conv
  formula with padding cl: ``floor((L + 2cl − k) / s) + 1``) whose windows are centred on
  positions ``L−1, L−1−s, L−1−2s, …``: anchored on the most recent behaviour (the one always
  present) rather than on slot 0 (padding for most users). A user's representations therefore do
  not depend on how much left padding the batch adds. For s = 1 this is the plain conv with
  zero padding cl on both ends; for s > 1 it equals the standard conv on the time-reversed sequence.
* Masks. Layer 1 keeps the input mask (one output per behaviour, aligned with ``ll_mask``);
  a later layer's output is valid when any input in its window is valid (max-pool of the mask
  with the layer's kernel, stride and padding).
* Auxiliary attention (eqs. 8–9): the scaled scores are softmax-normalised over the valid
  positions (as CSA/MSA, docs/design.md, "Models and readings"); padding gets exactly zero weight, an empty row gives IR = 0.
* Receptive field (eq. 7 with strides): ``r_1 = k_1``, ``r_{n+1} = r_n + (k_{n+1} − 1)·J_n``;
  with unit strides this is eq. 7 read with ``cl_n`` = window width (see :func:`receptive_fields`).
* PEG (eqs. 10–12): one generator per layer that uses it; the per-user filters are applied as
  one batched operation, never a loop over users. Aggregations: ``replace`` (the paper),
  ``sum`` (global + personal pre-activations, one bias), ``concat`` (both branches through
  their ReLU, concatenated, a 1×1 linear back to C). Without profile fields (P = 0) the
  generator input is a learned constant, so the generated filter is shared by all users (warned).
  The personal conv is one unfold + bmm (see :func:`personal_conv1d` for why not a grouped conv).
* PEG memory: the generated filters are ``B·C·C_in·k`` floats per layer. At B = 512,
  C = C_in = 256, k = 15 that is 503 M floats = 2.0 GB (fp32) per layer and 8.1 GB for the
  default 4 layers; the unfolded inputs kept for backward add ``B·C_in·k·L_n`` floats (3.9 GB
  for layer 1 at L = 500, 1.3 GB for the later three). Measured (CPU, fp32, B = 512, L = 500,
  paper defaults): forward + backward peak +13.1 GB; forward 41 s, total 86 s on 2 cores.
  W^P2 holds ``h·C·C_in·k`` = 63 M parameters per layer (255.6 M for the four generators, ~1 GB
  fp32, ×3 with Adam's moments). ``peg.rank = 8`` cuts a generator to 8.8 M parameters (the
  filters are still materialised); ``peg.layers = first`` or a smaller ``context.out_dim`` cut
  the activations.
* PEG cost option ``peg.filters = depthwise`` (a model change; default ``full`` = the paper):
  eq. 11 generates a per-user depthwise filter ``G_u (C_in, k)`` and a shared 1×1 mix ``W^S``
  follows, i.e. eq. 12 with ``W^PC_u[c, i, τ] = W^S[c, i]·G_u[i, τ]`` (see :class:`TCNLayer`).
  At the paper's sizes a generator holds 0.26 M parameters instead of 63 M (cain: 6.1 M in all
  instead of 260.4 M) and a layer's conv costs ``C_in·(k + C)`` instead of ``C·C_in·k``
  multiply-adds per output position (14× fewer); nothing of size ``B·C·C_in·k`` exists.
* Autocast: biases are added in the conv output's dtype, so a bf16 layer output stays bf16 (an
  fp32 bias would promote it, and the next layer would cast its unfolded input back); no-op in fp32.
* GRU: two unidirectional GRUs (past→t and future→t, ``context.bidirectional``), each run on
  the valid behaviours packed to the front (a batched stable sort of the mask), so padding never
  enters a hidden state; output = raw hidden states (no ReLU: they are tanh-bounded already).
* Self-attention: one masked multi-head layer, padded keys masked; Q and K see a sinusoidal
  encoding of the distance to the most recent slot (without it attention is order-blind and has
  no notion of "adjacent"); ReLU after the layer as for the TCN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raylsm.config import ConfigError
from raylsm.models.config import ModelConfig, PEGConfig
from raylsm.models.layers import MultiHeadTargetAttention, gather_seq, masked_softmax

# ----------------------------------------------------------------------------- geometry


def window_padding(length: int, kernel: int, stride: int) -> tuple[int, int]:
    """(left, right) zero padding giving ``ceil(length / stride)`` windows centred on
    ``length−1, length−1−stride, …`` (anchored on the most recent position). ``left`` can be
    negative: that many leading positions lie in no window and are cropped."""
    half = (kernel - 1) // 2
    n_out = (length + stride - 1) // stride
    first_centre = (length - 1) - (n_out - 1) * stride
    return half - first_centre, half


def output_length(length: int, kernel: int, stride: int) -> int:
    """Conv output length with padding (k−1)/2 on both ends: ``floor((L + 2p − k)/s) + 1 = ceil(L/s)``."""
    half = (kernel - 1) // 2
    return (length + 2 * half - kernel) // stride + 1


def msia_layer_specs(cfg: ModelConfig) -> list[tuple[int, int]]:
    """``(kernel, stride)`` of every TCN layer: layer 1 from ``context.cl`` (stride 1), then MSIA's later layers."""
    specs = [(2 * cfg.context.cl + 1, 1)]
    if cfg.msia.enabled:
        later_cl = cfg.context.cl if cfg.msia.later_cl is None else cfg.msia.later_cl
        specs += [(2 * later_cl + 1, cfg.msia.later_stride)] * (cfg.msia.layers - 1)
    return specs


def receptive_fields(specs: Sequence[tuple[int, int]]) -> list[int]:
    """Receptive field (window width in input behaviours) of each layer's outputs.

    Eq. (7) generalised to strides: ``r_1 = k_1``, ``r_{n+1} = r_n + (k_{n+1} − 1)·J_n`` with
    ``J_n = s_1⋯s_n``. With unit strides this is eq. 7, ``cl_{n+1} = cl_n + fs_{n+1} − 1``, with
    ``cl_n`` read as the window width; the one-sided context length is ``(r_n − 1) / 2``.
    """
    fields, jump = [], 1
    for i, (kernel, stride) in enumerate(specs):
        fields.append(kernel if i == 0 else fields[-1] + (kernel - 1) * jump)  # Eq. (7)
        jump *= stride
    return fields


def output_lengths(specs: Sequence[tuple[int, int]], length: int) -> list[int]:
    """Output length of each layer for an input of ``length`` behaviours."""
    out = []
    for kernel, stride in specs:
        length = output_length(length, kernel, stride)
        out.append(length)
    return out


def _pad_time(x: Tensor, left: int, right: int) -> Tensor:
    """Zero-pad (or, for negative ``left``, crop) the last dimension."""
    if left < 0:
        x = x[..., -left:]
        left = 0
    return F.pad(x, (left, right))


# ----------------------------------------------------------------------------- PEG


class FilterGenerator(nn.Module):
    """PEG sub-network (eqs. 10–11): profile ``I`` -> per-user filters ``W^PC`` (B, C, C_in, k).

    ``O = ReLU(W^P1 I + b^P1)``; ``W^PC = Reshape(W^P2 O + b^P2)``. Init: ``b^P2`` is a
    Xavier-uniform global filter and ``W^P2 ~ N(0, 1/(h·C_in·k))``, so at init every user's
    filter is a sensible conv filter plus a personal deviation of the same (Xavier) scale.
    ``rank > 0`` factorises ``W^P2 = U·V`` (U: N×r, V: r×h). ``profile_dim = 0``: the input is a
    learned constant (all users share one generated filter).

    ``depthwise``: eq. 11 generates a per-user *depthwise* filter ``G (B, C_in, k)`` (C_in·k
    outputs instead of C·C_in·k; see :class:`TCNLayer`); ``b^P2 ~ U(±√(3/k))`` (variance 1/k, so
    that with the shared Xavier channel mix the effective filter has Xavier scale) and
    ``W^P2 ~ N(0, 1/(h·k))``.
    """

    def __init__(
        self, profile_dim: int, hidden: int, rank: int, c_out: int, c_in: int, kernel: int, depthwise: bool = False
    ):
        super().__init__()
        self.shape = (c_in, kernel) if depthwise else (c_out, c_in, kernel)
        fan = kernel if depthwise else c_in * kernel  # inputs each generated output value multiplies
        n = math.prod(self.shape)
        if profile_dim > 0:
            self.fc1 = nn.Linear(profile_dim, hidden)  # W^P1, b^P1
            nn.init.xavier_uniform_(self.fc1.weight)
            nn.init.zeros_(self.fc1.bias)
            self.const = None
        else:
            self.fc1 = None
            self.const = nn.Parameter(torch.ones(hidden))  # W^P1 I + b^P1 with I = ∅
        self.low = None
        width = hidden
        if rank > 0:
            self.low = nn.Linear(hidden, rank, bias=False)  # V of W^P2 = U·V
            nn.init.xavier_uniform_(self.low.weight)
            width = rank
        self.fc2 = nn.Linear(width, n)  # W^P2 (or U), b^P2
        nn.init.normal_(self.fc2.weight, std=1.0 / math.sqrt(width * fan))
        with torch.no_grad():
            if depthwise:
                bound = math.sqrt(3.0 / kernel)
                self.fc2.bias.uniform_(-bound, bound)
            else:
                self.fc2.bias.copy_(nn.init.xavier_uniform_(torch.empty(self.shape, device=self.fc2.bias.device)).flatten())

    def forward(self, profile: Tensor) -> Tensor:
        if self.fc1 is not None:
            o = F.relu(self.fc1(profile))  # Eq. (10): (B, h)
        else:
            o = F.relu(self.const).expand(profile.shape[0], -1)  # Eq. (10) with I = ∅: (B, h)
        if self.low is not None:
            o = self.low(o)  # (B, r)
        return self.fc2(o).view(-1, *self.shape)  # Eq. (11): (B, C, C_in, k), or (B, C_in, k) depthwise


def personal_conv1d(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    """Conv of each row of ``x (B, C_in, L')`` (already padded) with its own filter
    ``weight (B, C, C_in, k)`` as ONE batched matmul over the unfolded windows (unfold + bmm).

    A grouped conv (batch folded into the groups) computes the same, but its CPU backward
    degrades abruptly with the group count (torch 2.13, C = C_in = 256, k = 15, L = 500, one layer:
    2.8 s at B = 48, 227 s at B = 96, vs 6.5 s for this bmm); bmm is a plain batched GEMM on every
    device. Cost: the unfolded input ``(B, C_in·k, L_out)`` is kept for backward.
    """
    b, c_in, _ = x.shape
    c_out, kernel = weight.shape[1], weight.shape[3]
    cols = x.unfold(2, kernel, stride)  # (B, C_in, L_out, k): window views
    cols = cols.permute(0, 1, 3, 2).reshape(b, c_in * kernel, -1)  # (B, C_in·k, L_out)
    return torch.bmm(weight.reshape(b, c_out, c_in * kernel), cols)  # (B, C, L_out)


def depthwise_conv1d(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    """Depthwise conv of each row of ``x (B, C_in, L')`` (already padded) with its own per-channel filters
    ``weight (B, C_in, k)``: ONE grouped conv with the batch folded into the channels (B·C_in groups
    of one channel each) -> (B, C_in, L_out). Depthwise grouped convs are a native kernel on CPU and
    GPU (unlike the full grouped conv, see :func:`personal_conv1d`), and nothing is unfolded.
    """
    b, c_in, length = x.shape
    out = F.conv1d(x.reshape(1, b * c_in, length), weight.reshape(b * c_in, 1, -1), stride=stride, groups=b * c_in)
    return out.view(b, c_in, -1)  # (1, B·C_in, L_out) -> (B, C_in, L_out)


# ----------------------------------------------------------------------------- TCN layer


def _identity(x: Tensor) -> Tensor:
    return x


class TCNLayer(nn.Module):
    """One TCN layer (eq. 5, or eq. 12 with PEG): kernel ``2·cl+1``, ``stride``, then ``activation``
    (``relu``: §4.2.1's non-linearity; ``none``: eq. 5 as printed, linear in the window).

    ``forward(x (B, C_in, L), mask (B, L), profile (B, P)) -> (y (B, C, L_out), mask_out (B, L_out))``;
    ``keep_mask=True`` (layer 1) keeps the input mask, otherwise the window max-pool. ``x`` must
    already be zero at padded positions (the encoder guarantees it); ``y`` is zero where
    ``mask_out`` is False.

    PEG filters (``peg.filters``): ``full`` = the paper, one generated ``W^PC_u (C, C_in, k)`` per
    user (eqs. 11–12). ``depthwise`` = eq. 11 generates a per-user depthwise filter
    ``G_u (C_in, k)`` and a shared 1×1 mix ``W^S (C, C_in)`` follows, i.e. eq. 12 with the
    depthwise-separable filter ``W^PC_u[c, i, τ] = W^S[c, i]·G_u[i, τ]``:
    ``cr_t = W^S (G_u ⊛ ctxe)_t + b_c``. The user still sets how much each neighbour (τ) of each
    feature (i) counts; only the channel mixing is shared. It generates C× fewer values
    (C_in·k per user), and its conv costs ``B·C_in·(k + C)·L_out`` instead of ``B·C·C_in·k·L_out``.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        cl: int,
        stride: int,
        peg: PEGConfig | None = None,
        profile_dim: int = 0,
        keep_mask: bool = False,
        activation: str = "relu",
        init: str = "xavier",
        init_noise: float = 0.1,
    ):
        super().__init__()
        self.kernel, self.stride, self.keep_mask = 2 * cl + 1, stride, keep_mask
        self.act = F.relu if activation == "relu" else _identity
        self.aggregation = peg.aggregation if peg is not None else None
        # Global filter W^C (eq. 5); not created when PEG replaces it (no unused parameters under DDP).
        self.weight = None
        if self.aggregation != "replace":
            self.weight = nn.Parameter(torch.empty(c_out, c_in, self.kernel))
            nn.init.xavier_uniform_(self.weight)
            if init in ("dirac", "box"):
                with torch.no_grad():
                    self.weight.mul_(init_noise)
                    eye = torch.eye(c_out, c_in)
                    if init == "dirac":  # cr_t starts as lhe_t (the first min(C, C_in) channels) plus scaled noise
                        self.weight[:, :, self.kernel // 2] += eye
                    else:  # box: cr_t starts as the mean of its window (zero padding counts) plus scaled noise
                        self.weight += eye.unsqueeze(-1) / self.kernel
        self.bias = nn.Parameter(torch.zeros(c_out))  # b_c, eqs. (5)/(12)
        self.generator = None
        self.mix = None
        self.personal_bias = None
        self.proj = None
        if peg is not None:
            depthwise = peg.filters == "depthwise"
            self.generator = FilterGenerator(profile_dim, peg.hidden, peg.rank, c_out, c_in, self.kernel, depthwise)
            if depthwise:
                self.mix = nn.Parameter(torch.empty(c_out, c_in))  # W^S: shared channel mix after G_u
                nn.init.xavier_uniform_(self.mix)
            if self.aggregation == "concat":
                self.personal_bias = nn.Parameter(torch.zeros(c_out))  # b_c of the personal branch
                self.proj = nn.Conv1d(2 * c_out, c_out, 1)  # [global ‖ personal] -> C
                nn.init.xavier_uniform_(self.proj.weight)
                nn.init.zeros_(self.proj.bias)

    def personal(self, xp: Tensor, profile: Tensor) -> Tensor:
        """Eq. (12) without ``b_c``: the user's generated filter applied to ``xp (B, C_in, L')`` -> (B, C, L_out)."""
        w = self.generator(profile)  # Eqs. (10)–(11)
        if self.mix is None:
            return personal_conv1d(xp, w, self.stride)  # W^PC_u ⊛ x  (B, C, L_out)
        return F.conv1d(depthwise_conv1d(xp, w, self.stride), self.mix.unsqueeze(-1))  # W^S (G_u ⊛ x)  (B, C, L_out)

    def forward(self, x: Tensor, mask: Tensor, profile: Tensor) -> tuple[Tensor, Tensor]:
        left, right = window_padding(x.shape[-1], self.kernel, self.stride)
        xp = _pad_time(x, left, right)  # (B, C_in, L + left + right)
        # Biases join in the conv output's dtype: a no-op in fp32; under autocast it keeps the
        # layer's output (and the next layer's unfolded input) in bf16 instead of promoting to fp32.
        if self.generator is None:
            z = F.conv1d(xp, self.weight, stride=self.stride)  # (B, C, L_out)
            y = self.act(z + self.bias.view(1, -1, 1).to(z.dtype))  # Eq. (5)
        else:
            personal = self.personal(xp, profile)  # (B, C, L_out)
            bias = self.bias.view(1, -1, 1).to(personal.dtype)  # (1, C, 1)
            if self.aggregation == "replace":
                y = self.act(personal + bias)  # Eq. (12)
            elif self.aggregation == "sum":
                y = self.act(F.conv1d(xp, self.weight, stride=self.stride) + personal + bias)  # Eq. (5) + (12)
            else:  # concat
                glob = self.act(F.conv1d(xp, self.weight, stride=self.stride) + bias)  # Eq. (5)
                pers = self.act(personal + self.personal_bias.view(1, -1, 1).to(personal.dtype))  # Eq. (12)
                y = self.proj(torch.cat([glob, pers], dim=1))  # (B, 2C, L_out) -> (B, C, L_out)
        if self.keep_mask:
            mask_out = mask
        else:
            m = _pad_time(mask.to(y.dtype).unsqueeze(1), left, right)  # (B, 1, L + left + right)
            mask_out = F.max_pool1d(m, self.kernel, self.stride).squeeze(1) > 0  # (B, L_out): any valid in window
        return torch.where(mask_out.unsqueeze(1), y, 0.0), mask_out


# ----------------------------------------------------------------------------- alternatives


class GRUContext(nn.Module):
    """GRU alternative (CAIN Table 1, "RNN"): ``(B, L, C_in), (B, L) -> (B, L, C)``.

    Bidirectional: a forward GRU (hidden ceil(C/2)) over past→t and a backward GRU (floor(C/2))
    over future→t, concatenated; otherwise one forward GRU of size C. Each runs on the valid
    behaviours moved to the front (batched stable sort), so padding never enters a hidden state.
    """

    def __init__(self, in_dim: int, out_dim: int, bidirectional: bool):
        super().__init__()
        fwd = (out_dim + 1) // 2 if bidirectional else out_dim
        self.fwd = nn.GRU(in_dim, fwd, batch_first=True)
        self.bwd = nn.GRU(in_dim, out_dim - fwd, batch_first=True) if out_dim - fwd > 0 else None

    @staticmethod
    def _run(gru: nn.GRU, x: Tensor, mask: Tensor) -> Tensor:
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (B, L): valid first, in order
        arange = torch.arange(x.shape[1], device=x.device).expand_as(order)
        inverse = torch.empty_like(order).scatter_(1, order, arange)  # (B, L)
        out, _ = gru(gather_seq(x, order))  # (B, L, H): right-padded run
        return gather_seq(out, inverse)  # (B, L, H): back in place

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out = self._run(self.fwd, x, mask)  # (B, L, ceil(C/2))
        if self.bwd is not None:
            back = self._run(self.bwd, x.flip(1), mask.flip(1)).flip(1)  # (B, L, floor(C/2))
            out = torch.cat([out, back], dim=-1)  # (B, L, C)
        return out


def recency_encoding(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Sinusoidal encoding (L, dim) of the distance ``L−1−t`` to the most recent slot."""
    dist = torch.arange(length - 1, -1, -1, device=device, dtype=dtype).unsqueeze(1)  # (L, 1)
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=dtype) * (-math.log(10000.0) / max(dim, 1))
    )  # (ceil(dim/2),)
    enc = torch.zeros(length, dim, device=device, dtype=dtype)
    enc[:, 0::2] = torch.sin(dist * freq)
    enc[:, 1::2] = torch.cos(dist * freq[: dim // 2])
    return enc


class SelfAttentionContext(nn.Module):
    """Self-attention alternative (CAIN Table 1): one masked multi-head layer, ``(B, L, C_in) -> (B, L, C)``.

    ``y_t = ReLU(concat_h Σ_u softmax_valid_u(Q_h(x_t+pe_t) · K_h(x_u+pe_u) / √d) V_h x_u)``.
    """

    def __init__(self, in_dim: int, out_dim: int, heads: int):
        super().__init__()
        if out_dim % heads:
            raise ConfigError(f"model.context.heads: out_dim {out_dim} must be divisible by heads {heads}")
        self.heads, self.head_dim = heads, out_dim // heads
        self.w_q = nn.Linear(in_dim, out_dim, bias=False)
        self.w_k = nn.Linear(in_dim, out_dim, bias=False)
        self.w_v = nn.Linear(in_dim, out_dim, bias=False)
        for lin in (self.w_q, self.w_k, self.w_v):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, _ = x.shape
        xp = x + recency_encoding(n, x.shape[-1], x.device, x.dtype)  # (B, L, C_in)
        q = self.w_q(xp).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        k = self.w_k(xp).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        v = self.w_v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, L, L)
        w = masked_softmax(scores, mask[:, None, None, :])  # padded keys get 0
        return F.relu((w @ v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim))  # (B, L, C)


# ----------------------------------------------------------------------------- encoder


class ContextEncoder(nn.Module):
    """Context-aware representations ``cr_t`` (eq. 5/6) and MSIA's auxiliary interests (eq. 9).

    ``forward(seq (B, L, C_in), mask (B, L), cand (B, Dq), profile (B, P)) -> (cr (B, L, C), aux (B, aux_dim))``.
    Attributes: ``out_dim`` (C), ``aux_dim`` (= (layers−1)·heads·att_dim with MSIA, else 0),
    ``layers`` (the TCN layers, ``layers[0]`` feeds the lifelong module; kind=tcn),
    ``aux_attentions`` (one per later layer), ``extractor`` (kind=gru / self_attention).
    """

    def __init__(self, cfg: ModelConfig, in_dim: int, query_dim: int, profile_dim: int):
        super().__init__()
        ctx, msia, peg = cfg.context, cfg.msia, cfg.peg
        self.kind = ctx.kind
        self.out_dim = ctx.out_dim or in_dim
        self.aux_dim = 0
        self.layers = nn.ModuleList()
        self.aux_attentions = nn.ModuleList()
        self.extractor: nn.Module | None = None
        if self.kind != "tcn" and (msia.enabled or peg.enabled):
            raise ConfigError("model.msia/peg: MSIA and PEG stack TCN layers and need model.context.kind=tcn")
        if self.kind == "tcn":
            specs = msia_layer_specs(cfg)
            if peg.enabled and peg.layers == "later" and len(specs) < 2:
                raise ConfigError("model.peg.layers=later: needs model.msia.enabled with model.msia.layers >= 2")
            if peg.enabled and profile_dim == 0:
                warnings.warn(
                    "PEG without profile features: the generator input is a learned constant, "
                    "so every user gets the same generated filters",
                    stacklevel=2,
                )
            for i, (kernel, stride) in enumerate(specs):
                use_peg = peg.enabled and (peg.layers == "all" or (peg.layers == "first") == (i == 0))
                self.layers.append(
                    TCNLayer(
                        in_dim if i == 0 else self.out_dim,
                        self.out_dim,
                        (kernel - 1) // 2,
                        stride,
                        peg if use_peg else None,
                        profile_dim,
                        keep_mask=(i == 0),
                        activation=ctx.activation,
                        init=ctx.init,
                        init_noise=ctx.init_noise,
                    )
                )
                if i > 0:
                    att = MultiHeadTargetAttention(query_dim, self.out_dim, msia.heads, msia.att_dim)
                    for lin in (att.w_q, att.w_k, att.w_v):
                        nn.init.xavier_uniform_(lin.weight)
                    self.aux_attentions.append(att)
                    self.aux_dim += att.out_dim
        elif self.kind == "gru":
            self.extractor = GRUContext(in_dim, self.out_dim, ctx.bidirectional)
        elif self.kind == "self_attention":
            self.extractor = SelfAttentionContext(in_dim, self.out_dim, ctx.heads)
        else:
            raise ConfigError(f"model.context.kind: ContextEncoder needs tcn, gru or self_attention, got {self.kind!r}")

    def forward(self, seq: Tensor, mask: Tensor, cand: Tensor, profile: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.where(mask.unsqueeze(-1), seq, 0.0)  # (B, L, C_in): padding -> 0
        aux = seq.new_zeros((seq.shape[0], 0))
        if self.extractor is not None:
            cr = self.extractor(x, mask)  # (B, L, C)
            return torch.where(mask.unsqueeze(-1), cr, 0.0), aux

        h, m = self.layers[0](x.transpose(1, 2), mask, profile)  # Eq. (5)/(12): (B, C, L)
        cr = h.transpose(1, 2).contiguous()  # (B, L, C): major attention input, eq. (6)
        interests = []
        for layer, attention in zip(self.layers[1:], self.aux_attentions):
            h, m = layer(h, m, profile)  # Eq. (5)/(12), stride s_n: (B, C, L_n)
            interests.append(attention(cand, h.transpose(1, 2), m))  # Eqs. (8)–(9): (B, heads·d)
        if interests:
            aux = torch.cat(interests, dim=-1)  # (B, aux_dim)
        return cr, aux
