"""Seeded generator of synthetic contract-v1 datasets with planted, documented effects.

``generate(out, ...)`` writes ``<out>/manifest.json`` and ``<out>/{train,test}/part-NNNNN.parquet``
(docs/design.md, "Dataset contract"). Every random draw is a counter-based hash (SplitMix64) of ``(seed, stream, key)``, so a
user's behaviour timeline is a *fixed property of the user*: impressions of one user at different
times see prefixes of the same timeline. Same config → byte-identical shards; the rows themselves do
not depend on the chunk size (only the row groups do).
Work is vectorised numpy over chunks of rows, written with one ``pq.ParquetWriter`` per shard, so
memory is bounded by one chunk (plus the users' timelines, materialised once when they fit
``cache_elems`` values; otherwise rows are hashed directly — same values either way).

Planted effects (defaults in brackets):

* **Hidden interests, cross-domain bridge.** ``interests`` [32] hidden topics; every item and every
  category belongs to one. In ``cross`` mode the target domain (candidates, ``st_tgt_*``) and the
  source domain (``ll_*``, ``st_src_*``) use **disjoint item and category id ranges**
  (target items ``1..tgt_items`` [10k], source items after them [50k]; ``cates_per_interest`` [4]
  categories per interest and domain); only the hidden interests are shared. In ``single`` mode
  (CAIN's setting) one item space [``src_items``] serves candidates, ``ll_*`` and ``st_src_*``, and
  ``st_tgt_*`` are empty lists.
* **Users.** Profile ``age`` 1..7, ``gender`` 1..2 (each 0 = unknown w.p. 0.1), ``activity`` 1..4.
  Each user has ``long_interests`` [3] *real* long-term interests (drawn from an (age, gender)
  dependent popularity) and ``decoy_interests`` [2] interests they browse a lot but do not like.
  **Current mix (drift):** per window of ``window_sessions`` [10] sessions the user has 2 current
  interests, each a long-term one w.p. ``mix_long`` [0.7], else a random transient one.
* **Lifelong timeline (``ll_*``, source domain), sessions/bursts.** Sessions of 4..12 behaviours (per
  user), one a minute, hours to a day apart (the rate is set by activity so a user has ≈ 0.6/1.2/2/4 ×
  ``ll_len`` behaviours over a full ``history_days`` [60] history; histories start 30–100 % of it
  before day 0). A session is *real* w.p. ``p_real`` [0.4] (focus = a current interest), *decoy*
  w.p. ``p_decoy`` [0.4] (focus = a decoy interest) or *random* [0.2]. A behaviour is a focus item
  w.p. ``focus`` [0.5], else a feed item of a uniform interest. Each decoy interest fills ≈ 12 % of a
  lifelong sequence, each long-term interest only ≈ 7 %: frequency alone points the wrong way, and
  only a small minority of the ``ll_len`` [500] behaviours share a given candidate's interest.
* **Context effect (``ll_ctx``: 1 skip, 2 view, 3 long-view, 4 like).** A real session is engaged
  (3/4), decoy and random sessions are not (1/2). Feed items show the session's engagement (own ctx
  randomised w.p. ``feed_ctx_noise`` [0.1]); focus items' own ctx is randomised (uniform 1..4) w.p.
  ``ctx_noise`` by activity [0.6, 0.7, 0.8, 0.9]. So a focus item's own ctx is a weak witness
  (P(ctx ≥ 3) ≈ 0.62 real vs 0.38 decoy), while its session neighbours tell (≈ 0.95 vs 0.05):
  counting the lifelong items of the candidate's interest weighted by their neighbours'
  engagement predicts the label far better than weighting by their own ctx (a TCN's job; the
  noise level depends on the profile, which PEG can use).
* **``ll_gap``** = 1 + ⌊g · log2(1 + Δt / 1 min)⌋ with Δt = ``ts`` − behaviour time and g such that
  the oldest possible behaviour lands in bucket ``gap_buckets`` − 1 [63].
* **Short-term sequences.** ``st_src_*`` = the last ``st_len`` [50] behaviours of the lifelong
  timeline (the tail of ``ll_*``). ``st_tgt_*`` = the last ``st_len`` target-domain behaviours:
  1..3 (per user) right after each session, each an item of a *current* interest w.p. 1 −
  ``st_noise`` [0.8]. Co-occurring ``st_tgt`` and ``st_src`` items of a user thus share the user's
  current interests although their ids are disjoint — what LCN's contrastive CRP can align.
* **Impressions and labels.** A row draws a user (weight ∝ activity) and ``ts`` uniform over days
  0..``train_days``−1 [0..6] (train) or the next ``test_days`` [1] (test), so every test ``ts`` is
  later than every train ``ts``; all sequences hold only behaviours strictly before ``ts``, oldest
  first. The candidate's interest k is a long-term interest w.p. 0.25, a current one w.p. 0.2, a
  decoy w.p. 0.2, else uniform (``cand_mix``), and
  ``P(click) = σ(−3.0 + 1.8·[k long-term] + 1.5·[k current] + b_item + b_user)``, b ~ N(0, 0.3)
  (``base_logit``, ``w_long``, ``w_current``, ``*_bias_std``). Decoys get no uplift. Base CTR ≈
  0.22; CTR ≈ 0.44 vs 0.07 for long-term vs other candidates, ≈ 0.50 vs 0.10 for current vs other.

Effect switches and the mechanism each one rewards (all on by default):

* ``bridge`` (``--bridge on|off``). On: ``st_tgt`` holds the user's current interests, so
  target and source items that co-occur in one impression's short-term sequences share a hidden
  interest — the only link between the disjoint id spaces besides the labels. Rewards LCN's CRP
  (cross-domain pairs). Off: ``st_tgt`` items are of uniform random interests (``st_noise`` = 1):
  nothing co-occurs, CRP has nothing to align (and the short-term target signal is gone as well).
* ``context_effect`` (``--context-effect on|off``). On: a session's engagement (``ll_ctx`` 3/4 vs
  1/2) says whether it is real or decoy. Rewards a context encoder (CAIN's TCN: neighbours'
  engagement) and context-aware attention (MSA/FSA, TWIN's cross features). Off: each session is
  engaged with probability ``p_real`` regardless of its kind, so ctx carries no information.
  Where it pays most: ``--domains single`` (CAIN's setting) with ``--ctx-noise 1``. There the
  candidate and the lifelong behaviours share one id space, so retrieving the behaviours of the
  candidate's interest is exact and what is left to tell is real vs decoy: the engagement of the
  neighbours. In ``cross`` mode retrieval first needs the learned bridge, and the context effect
  shows far less (docs/experiments.md, "CAIN's own setting: one item space").
* Frequency gap (``--p-real``, ``--p-decoy``): the share of real (liked) and decoy sessions. With
  the defaults (0.4 / 0.4 over 2 current and 2 decoy interests) each decoy interest fills more of
  the lifelong sequence than each liked one, so counting matching behaviours alone (DIN) is misled;
  ``--p-decoy 0`` makes counting suffice, ``--p-real 0.7 --p-decoy 0.1`` makes liked interests the
  frequent ones. The world size (``--interests``, ``--cates-per-interest``, ``--tgt-items``,
  ``--src-items``) sets how many rows a model needs to learn the bridge.
* Short-term noise (``--st-noise`` [0.2]): the share of ``st_tgt`` items of a random interest. The
  short-term target sequence is a shortcut: at 0.2 it alone ranks with AUC ≈ 0.74 at ``ll_len`` 100,
  leaving the lifelong sequence ≈ +0.01 and the context effect ≈ +0.004 on top (a logistic model on
  the hidden-interest counts). At 0.8 the shortcut falls to ≈ 0.64 and the lifelong sequence with its
  neighbours' engagement adds ≈ +0.06 (+0.03 of it from the neighbours), so a context encoder has
  something to find; the bridge weakens with it (fewer co-occurring pairs share an interest).
* Session focus (``--focus`` [0.5]): the share of a session's behaviours of its focus interest. At 0.5 a
  window also sees *topic*: a behaviour whose neighbours share its interest is a focus item, a lone
  one a feed item of a random interest, a signal even with the context effect off. At 1 every
  behaviour of a session shares its interest, so topic says nothing; but then the behaviours of the
  candidate's interest are the session itself, and their own engagement, summed, already tells real
  from decoy sessions (the neighbours add ≈ 0: 0.640 / 0.651 / 0.691 / 0.692 at ``--st-noise 0.8``).

Measured on 20k rows (seed 0, defaults): the true click probability ranks with AUC ≈ 0.84; "how many of
the last 20 ``st_tgt`` items share the candidate's interest" ≈ 0.75 (same category ≈ 0.73);
lifelong items of the candidate's interest, raw count ≈ 0.57, own ctx ≥ 3 ≈ 0.61, neighbours' mean
ctx ≥ 2.5 (±3 positions) ≈ 0.69.

Manifest vocab sizes are max id + 1 over the written rows (docs/design.md, "Dataset contract").

This module turns the rows into contract tables and writes the shards and the manifest. Its parts:
:mod:`raylsm.data.synth_config` (:class:`SynthConfig`, the options and their checks),
:mod:`raylsm.data.synth_hash` (the counter-based hash) and :mod:`raylsm.data.synth_world` (the
hidden world, the users' timelines, the impressions and their labels).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from raylsm.data.atomic import rebase, write_dataset
from raylsm.data.contract import PROFILE_PREFIX, Manifest, arrow_schema
from raylsm.data.synth_config import SynthConfig
from raylsm.data.synth_world import (PROFILE_FIELDS, World, build_world, impressions, source_behaviours,
                                     target_behaviours)

GENERATOR = "raylsm.data.synth"


# ----------------------------------------------------------------------------- rows


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64, copy=False)))


def chunk_table(world: World, r0: int, r1: int, split: str, schema: pa.Schema) -> pa.Table:
    """The contract-v1 table of rows ``r0..r1-1`` of ``split``."""
    cfg = world.cfg
    imp = impressions(world, r0, r1, split)
    u, ts = imp["user_id"], imp["ts"]
    cols: dict[str, pa.Array] = {
        "user_id": pa.array(u), "item_id": pa.array(imp["item_id"]), "item_cate": pa.array(imp["item_cate"]),
        "label": pa.array(imp["label"]), "ts": pa.array(ts),
    }
    prof = world.profile[u]
    for j, f in enumerate(PROFILE_FIELDS):
        cols[PROFILE_PREFIX + f] = pa.array(np.ascontiguousarray(prof[:, j]))
    if cfg.domains == "cross":
        tgt = target_behaviours(world, u, imp["n_tgt"], cfg.st_len)
        cols["st_tgt_items"] = _list(tgt["offsets"], tgt["items"])
        cols["st_tgt_cates"] = _list(tgt["offsets"], tgt["cates"])
        del tgt
    else:
        empty = np.zeros(len(u) + 1, np.int64)
        cols["st_tgt_items"] = cols["st_tgt_cates"] = _list(empty, np.zeros(0, np.int64))
    st = source_behaviours(world, u, ts, imp["n_src"], cfg.st_len, context=False)
    cols["st_src_items"] = _list(st["offsets"], st["items"])
    cols["st_src_cates"] = _list(st["offsets"], st["cates"])
    del st
    ll = source_behaviours(world, u, ts, imp["n_src"], cfg.ll_len)
    for name in ("items", "cates", "ctx", "gap"):
        cols["ll_" + name] = _list(ll["offsets"], ll[name])
    del ll
    return pa.Table.from_arrays([cols[n] for n in schema.names], schema=schema)


# ----------------------------------------------------------------------------- driver


def _max_ids(table: pa.Table, acc: dict[str, int]) -> None:
    """Fold the table's largest id per vocab key into ``acc``."""
    import pyarrow.compute as pc

    keys = {"user": ["user_id"], "item": ["item_id", "st_tgt_items", "st_src_items", "ll_items"],
            "cate": ["item_cate", "st_tgt_cates", "st_src_cates", "ll_cates"], "ctx": ["ll_ctx"], "gap": ["ll_gap"]}
    keys.update({PROFILE_PREFIX + f: [PROFILE_PREFIX + f] for f in PROFILE_FIELDS})
    for key, names in keys.items():
        for name in names:
            col = table.column(name)
            if pa.types.is_list(col.type):
                col = pc.list_flatten(col)
            if len(col):
                acc[key] = max(acc.get(key, 0), pc.max(col).as_py())


def generate_config(out: str | Path, cfg: SynthConfig, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the dataset described by ``cfg`` to ``out``; return a summary (see :func:`generate`).

    The dataset is written beside ``out`` and swapped in once complete and checked
    (:mod:`raylsm.data.atomic`); an existing dataset in ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out)
    started = time.perf_counter()
    staged: dict[str, Path] = {}

    def write(root: Path) -> dict:
        staged["root"] = root
        return _write_shards(root, cfg, progress, out.name)

    summary = write_dataset(out, write, overwrite=overwrite)
    summary["out"] = str(out)
    summary["files"] = [rebase(f, staged["root"], out) for f in summary["files"]]
    summary["manifest"] = str(out / "manifest.json")
    seconds = time.perf_counter() - started
    summary.update(seconds=round(seconds, 3), rows_per_s=round(cfg.rows / max(seconds, 1e-9), 1))
    return summary


def _write_shards(out: Path, cfg: SynthConfig, progress: bool, label: str) -> dict:
    """Write every shard, then the manifest, into ``out`` (a fresh directory); return the summary."""
    world = build_world(cfg)
    schema = arrow_schema(list(PROFILE_FIELDS))
    per_row = max(1, cfg.ll_len + 2 * cfg.st_len)
    chunk_rows = max(1, min(50_000, cfg.chunk_elems // per_row))
    compression = None if cfg.compression == "none" else cfg.compression
    split_rows = cfg.split_rows
    files: list[str] = []
    maxima: dict[str, int] = {}
    labels = ll_total = 0
    bar = tqdm(total=cfg.rows, unit="rows", desc=f"synth {label}", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    base = 0
    for split in ("train", "test"):
        n = split_rows[split]
        (out / split).mkdir(exist_ok=True)
        n_files = max(1, min(cfg.shards, n))
        bounds = [base + n * i // n_files for i in range(n_files + 1)]
        for i in range(n_files):
            path = out / split / f"part-{i:05d}.parquet"
            with pq.ParquetWriter(path, schema, compression=compression) as writer:
                if bounds[i] == bounds[i + 1]:
                    writer.write_table(schema.empty_table())
                for r0 in range(bounds[i], bounds[i + 1], chunk_rows):
                    r1 = min(r0 + chunk_rows, bounds[i + 1])
                    table = chunk_table(world, r0, r1, split, schema)
                    _max_ids(table, maxima)
                    labels += int(np.asarray(table.column("label")).sum(dtype=np.int64))
                    ll_total += len(table.column("ll_items").combine_chunks().values)
                    writer.write_table(table, row_group_size=r1 - r0)
                    del table
                    bar.update(r1 - r0)
            files.append(str(path))
        base += n
    bar.close()

    vocab = {k: maxima.get(k, 0) + 1 for k in ("item", "cate", "ctx", "gap", "user")}
    profile_vocab = {f: maxima.get(PROFILE_PREFIX + f, 0) + 1 for f in PROFILE_FIELDS}
    manifest = Manifest(
        name=cfg.name, vocab=vocab, profile_vocab=profile_vocab, max_len={"st": cfg.st_len, "ll": cfg.ll_len},
        domains=cfg.domains, splits={s: {"rows": split_rows[s]} for s in ("train", "test")},
        source={"generator": GENERATOR, "params": _params(cfg), "seed": cfg.seed},
    )
    manifest_path = manifest.write(out)  # last: a directory without it is no dataset
    return {
        "out": str(out), "name": cfg.name, "domains": cfg.domains, "rows": cfg.rows,
        "train_rows": split_rows["train"], "test_rows": split_rows["test"],
        "splits": {s: {"rows": split_rows[s]} for s in ("train", "test")},
        "files": files, "manifest": str(manifest_path), "vocab": {**vocab, "profile": profile_vocab},
        "ctr": labels / cfg.rows, "mean_ll_len": ll_total / cfg.rows,
        "bytes": sum(Path(f).stat().st_size for f in files),
    }


def _params(cfg: SynthConfig) -> dict:
    params = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def generate(
    out: str | Path,
    users: int = 2000,
    rows: int = 100_000,
    ll_len: int = 500,
    st_len: int = 50,
    shards: int = 4,
    domains: str = "cross",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Generate a synthetic contract-v1 dataset under ``out`` (the ``raylsm data synth`` command).

    Returns ``{"out", "name", "domains", "rows", "train_rows", "test_rows", "splits", "files", "manifest",
    "vocab", "ctr", "mean_ll_len", "bytes", "seconds", "rows_per_s"}``. Raises ``ValueError`` naming
    the option for bad parameters, or ``--out`` when it holds files and ``overwrite`` is not set (or
    they are not a dataset). Other knobs: build a :class:`SynthConfig` and call
    :func:`generate_config`.
    """
    cfg = SynthConfig(users=users, rows=rows, ll_len=ll_len, st_len=st_len, shards=shards, domains=domains, seed=seed)
    return generate_config(out, cfg, progress=progress, overwrite=overwrite)

