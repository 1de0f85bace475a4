"""Every open reading against its alternatives, and every preset at its defaults, on three worlds.

``python -m jobs.experiments.readings [--what readings|presets|all] [--worlds cross,single,decoy]
[--seeds 3] [--size compact|large] [--only KEY ...] [--jobs 2] [--out runs/readings]``

The three worlds are synthetic datasets that differ in structure, each made by ``raylsm data synth``
with the flags in :data:`WORLDS` (written once under ``--out``):

* ``cross``: two disjoint item spaces, the short-term bridge on (what CRP's cross-domain pairs use);
* ``single``: one item space (CAIN's setting) of 2 000 items and the context effect at its clearest
  (``--ctx-noise 1``): only the neighbours' engagement tells a liked session from a decoy one; liked
  sessions more frequent than decoys (``--p-real 0.5 --p-decoy 0.3``);
* ``decoy``: cross-domain, a larger world, decoy sessions far more frequent than liked ones
  (``--p-real 0.25 --p-decoy 0.55``): counting the matching behaviours misleads;
* controls ``single_off`` (``single`` with ``--context-effect off``) and ``cross_off`` (``cross`` with
  ``--bridge off``): the same worlds with the effect a mechanism exploits removed (``--worlds
  single_off,cross_off``).

Every cell is a ``fit_local`` run (in process, no Ray) with the validation cut, early stopping and the
validation-chosen epoch of :func:`raylsm.train.loop.fit_local`; its test AUC/GAUC is the figure. A reading's
row gives, per world, Δ test AUC of the alternative over the preset's default, mean ± sd over the seeds
(paired by seed). ``presets`` gives each preset's test AUC mean ± sd per world, and the best
single-feature baseline (a count of the candidate's category in one sequence) for reference.
Cells are cached in ``<out>/cells.jsonl`` (a rerun only trains what is missing; a cell's key holds a digest of
the model and training config it resolves to, so a changed default trains it again); they run ``--jobs`` at a
time in subprocesses. The table is printed on stderr and written to ``<out>/<what>.md``; the last stdout
line is the JSON with every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

WORLD_BASE = ["--users", "3000", "--rows", "46000", "--st-len", "20", "--shards", "4"]
WORLDS: dict[str, list[str]] = {
    "cross": ["--domains", "cross", "--interests", "16", "--cates-per-interest", "2", "--tgt-items", "2000",
              "--src-items", "8000"],
    "single": ["--domains", "single", "--interests", "16", "--cates-per-interest", "2", "--src-items", "2000",
               "--ctx-noise", "1", "--p-real", "0.5", "--p-decoy", "0.3"],
    "decoy": ["--domains", "cross", "--interests", "24", "--cates-per-interest", "3", "--tgt-items", "3000",
              "--src-items", "12000", "--p-real", "0.25", "--p-decoy", "0.55", "--seed", "7"],
}
# Controls: each effect world with its effect switched off (a mechanism must gain nothing there).
WORLDS["single_off"] = [*WORLDS["single"], "--context-effect", "off"]
WORLDS["cross_off"] = [*WORLDS["cross"], "--bridge", "off"]
# Model and batch sizes of the two budgets (the papers' sizes are the presets' defaults).
SIZES: dict[str, dict] = {
    "compact": {"ll_len": 300, "set": ["model.features.emb_dim=16", "model.lap.k1=50", "model.lap.k2=20",
                                       "model.sim_soft.k=50", "model.eta.k=50", "model.twin.k=50",
                                       "train.batch_size=256", "data.st_len=20"]},
    "large": {"ll_len": 500, "set": ["model.features.emb_dim=32", "model.lap.k1=100", "model.lap.k2=30",
                                     "model.sim_soft.k=100", "model.eta.k=100", "model.twin.k=100",
                                     "train.batch_size=256", "data.st_len=20"]},
}
PRESET_NAMES = ["lcn", "cain", "lap", "din", "sim_soft", "eta", "sdim", "twin", "lcn_paper", "cain_paper"]
# Each open reading: (key, the preset it is measured on, the alternatives to the preset's default value); a key
# whose default differs between presets is measured on each of them. An alternative may name further overrides
# after a space, for readings that only hold together (reading_overrides).
READINGS: list[tuple[str, str, list[str]]] = [
    ("model.head_products", "lap", ["false"]),
    ("model.match_counts", "lap", ["false"]),
    ("model.match_counts", "din", ["false"]),
    ("model.match_counts", "lcn", ["false"]),
    ("model.match_counts", "cain", ["false"]),
    ("model.match_counts_dropout", "cain", ["0.0"]),
    ("model.match_counts_scope", "cain", ["short_term"]),
    ("train.lr", "lap", ["0.001", "0.003"]),
    ("model.features.item_dropout", "lap", ["0.0", "0.5"]),
    ("model.features.item_dropout", "din", ["0.0"]),
    ("model.features.item_dropout", "cain", ["0.0"]),
    ("model.features.item_dropout", "sim_soft", ["0.0"]),
    ("model.features.item_dropout", "eta", ["0.0"]),
    ("model.features.item_dropout", "sdim", ["0.0"]),
    ("model.features.item_dropout", "twin", ["0.0"]),
    ("model.lap.pooling", "lap", ["sum_scaled"]),
    ("model.lap.score_grad", "lap", ["msa"]),
    ("model.features.emb_init", "lap", ["normal"]),
    ("model.short_term_pooling", "lap", ["sum_scaled"]),
    ("train.lr_decay", "lcn", ["0.5", "0.1"]),
    ("train.lr_decay", "cain", ["0.1", "0.5"]),
    ("train.on_plateau", "cain", ["continue train.early_stop_patience=1"]),
    ("train.on_plateau", "lcn", ["continue train.early_stop_patience=1"]),
    ("train.rollback_finetune", "cain", ["false"]),
    ("train.rollback_finetune", "lcn", ["false"]),
    ("train.lr_decay", "lap", ["1.0", "0.3"]),
    ("train.lr_decay", "din", ["1.0"]),
    ("train.lr_decay", "sim_soft", ["1.0"]),
    ("train.lr_decay", "eta", ["1.0"]),
    ("train.lr_decay", "sdim", ["1.0"]),
    ("train.lr_decay", "twin", ["1.0"]),
    ("train.weight_decay", "lap", ["1.0", "3.0"]),
    ("model.head_dropout", "lap", ["0.3"]),
    ("model.crp.tau", "lcn", ["0.1"]),
    ("model.crp.weight", "lcn", ["0.1", "0.89", "2.0", "4.0", "8.0"]),
    ("model.crp.denominator", "lcn", ["with_positive"]),
    ("model.context.merge", "cain", ["replace"]),
    ("model.context.cl", "cain", ["7"]),
    ("model.context.activation", "cain", ["none"]),
    ("model.peg.filters", "cain", ["full"]),
]


def reading_overrides(key: str, value: str) -> tuple[str, ...]:
    """The overrides of one alternative of a reading: ``key=value``, and any ``k=v`` that follow it after a space."""
    first, *more = value.split(" ")
    return (f"{key}={first}", *more)


CELL_SCRIPT = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from raylsm.data.contract import read_manifest
from raylsm.models.layers import Vocab
from raylsm.train.config import resolve_job
from raylsm.train.local import chosen_epoch, fit_local
job = resolve_job(preset=sys.argv[2], overrides=json.loads(sys.argv[3]))
t = time.time()
_, history = fit_local(job, Vocab.from_manifest(read_manifest(job.data.path)))
best, last = chosen_epoch(history), history[-1]
print(json.dumps({"auc": best["auc"], "gauc": best["gauc"], "val_auc": best.get("val_auc"), "best_epoch": best["epoch"],
                  "epochs": len(history), "last_auc": last["auc"], "seconds": time.time() - t}))
"""


def make_world(out: Path, name: str, ll_len: int) -> Path:
    """The world's dataset under ``out`` (generated once with ``raylsm data synth``)."""
    path = out / f"{name}-ll{ll_len}"
    if not (path / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "raylsm", "data", "synth", "--out", str(path), "--ll-len", str(ll_len),
               *WORLD_BASE, *WORLDS[name], "--quiet"]
        print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def cell_key(size: str, preset: str, world: str, seed: int, sets: list[str], extra: list[str], epochs: int,
             overrides: list[str]) -> str:
    """A cell's cache key: what the command asked for, and a digest of the model and training config it resolves
    to, so that a cell trained before a preset's default changed is trained again, not reused."""
    import dataclasses
    import hashlib

    from raylsm.train.config import resolve_job

    job = resolve_job(preset=preset, overrides=overrides)
    config = json.dumps({"model": dataclasses.asdict(job.model), "train": dataclasses.asdict(job.train)},
                        sort_keys=True, default=str)
    return json.dumps([size, preset, world, seed, sets, extra, epochs, hashlib.sha256(config.encode()).hexdigest()[:16]])


def run_cell(preset: str, overrides: list[str], threads: int) -> dict:
    """Train one cell in a subprocess; its result dict."""
    proc = subprocess.run([sys.executable, "-c", CELL_SCRIPT, str(threads), preset, json.dumps(overrides)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cell {preset} {overrides} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def single_feature_auc(path: Path) -> dict[str, float]:
    """Test AUC of each one-feature ranker: the count of the candidate's category in one sequence."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raylsm.data.contract import shard_files
    from raylsm.train.metrics import auc

    out: dict[str, float] = {}
    t = pa.concat_tables([pq.read_table(f, partitioning=None) for f in shard_files(path, "test")])
    labels = t.column("label").to_numpy().astype(np.float64)
    cand = t.column("item_cate").to_numpy()
    for col in ("st_tgt_cates", "st_src_cates", "ll_cates"):
        lists = t.column(col).combine_chunks()  # (the worlds' lists are at most the models' lengths)
        flat = pc.list_flatten(lists).to_numpy()
        parent = pc.list_parent_indices(lists).to_numpy()
        hits = np.bincount(parent[flat == cand[parent]], minlength=len(cand)).astype(np.float64)
        out[col.replace("_cates", "_count")] = auc(labels, hits)
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _fmt(mean: float, sd: float, signed: bool = False) -> str:
    return f"{mean:+.4f} ± {sd:.4f}" if signed else f"{mean:.4f} ± {sd:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.experiments.readings", description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["readings", "presets", "all"], default="all")
    p.add_argument("--worlds", default="cross,single,decoy")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", choices=sorted(SIZES), default="compact")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--only", action="append", default=[], help="readings keys or preset names to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed for every cell (after the size's keys)")
    p.add_argument("--jobs", type=int, default=2, help="cells trained at once (each with cores/jobs threads)")
    p.add_argument("--out", default="runs/readings")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the tables from the cells already in <out>/cells.jsonl (n = seeds present)")
    args = p.parse_args(argv)
    worlds = [w.strip() for w in args.worlds.split(",") if w.strip()]
    bad = [w for w in worlds if w not in WORLDS]
    if bad or args.seeds < 1 or args.jobs < 1 or args.epochs < 1:
        p.error(f"--worlds: unknown {bad} (choose from {', '.join(WORLDS)})" if bad else
                "--seeds, --jobs and --epochs must be >= 1")
    keys = list(dict.fromkeys(k for k, _, _ in READINGS))
    unknown = [k for k in args.only if k not in keys and k not in PRESET_NAMES]
    if unknown:
        p.error(f"--only: unknown {unknown} (readings: {', '.join(keys)}; presets: {', '.join(PRESET_NAMES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES[args.size]
    paths = {w: make_world(out, w, size["ll_len"]) for w in worlds}

    # The cells: (preset, extra overrides) x world x seed.
    variants: list[tuple[str, tuple[str, ...]]] = []
    if args.what in ("presets", "all"):
        variants += [(name, ()) for name in PRESET_NAMES if not args.only or name in args.only]
    if args.what in ("readings", "all"):
        for key, preset, values in READINGS:
            if args.only and key not in args.only:
                continue
            variants += [(preset, ())] + [(preset, reading_overrides(key, v)) for v in values]
    variants = list(dict.fromkeys(variants))
    cache_file = out / "cells.jsonl"
    cache: dict[str, dict] = {}
    if cache_file.is_file():
        for line in cache_file.read_text().splitlines():
            rec = json.loads(line)
            cache[rec["key"]] = rec
    cells = []
    for preset, extra in variants:
        for w in worlds:
            for seed in range(args.seeds):
                overrides = [*size["set"], f"data.path={paths[w]}", f"data.ll_len={size['ll_len']}",
                             f"train.epochs={args.epochs}", *args.overrides, *extra, f"train.seed={seed}"]
                key = cell_key(args.size, preset, w, seed, list(args.overrides), list(extra), args.epochs, overrides)
                cells.append((key, preset, w, seed, extra, overrides))
    todo = sorted((c for c in cells if c[0] not in cache), key=lambda c: c[3])  # seed 0 of every cell first
    if args.report_only:
        todo = []
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    print(f"{len(cells)} cells, {len(todo)} to train ({args.jobs} at a time, {threads} threads each)",
          file=sys.stderr, flush=True)
    done = 0
    started = time.time()

    def work(cell):
        key, preset, w, seed, extra, overrides = cell
        return cell, run_cell(preset, overrides, threads)

    with ThreadPoolExecutor(args.jobs) as pool, cache_file.open("a") as sink:
        for (key, preset, w, seed, extra, _), res in pool.map(work, todo):
            rec = {"key": key, "preset": preset, "world": w, "seed": seed, "extra": list(extra), **res}
            cache[key] = rec
            sink.write(json.dumps(rec) + "\n")
            sink.flush()
            done += 1
            print(f"[{done}/{len(todo)} {time.time() - started:.0f}s] {preset} {' '.join(extra) or '(defaults)'} "
                  f"{w} seed {seed}: auc {res['auc']:.4f} (epoch {res['best_epoch']}, last {res['last_auc']:.4f})",
                  file=sys.stderr, flush=True)

    def by_seed(preset: str, extra: tuple[str, ...], w: str, field: str = "auc") -> dict[int, float]:
        return {c[3]: cache[c[0]][field] for c in cells
                if c[1] == preset and c[4] == extra and c[2] == w and c[0] in cache}

    def paired(a: tuple[str, tuple[str, ...]], b: tuple[str, tuple[str, ...]], w: str) -> list[float]:
        """AUC of cell ``a`` − AUC of cell ``b`` (each a (preset, extra) pair) in world ``w``, per seed both have."""
        mine, ref = by_seed(*a, w), by_seed(*b, w)
        return [mine[k] - ref[k] for k in sorted(mine) if k in ref]

    def aucs(preset: str, extra: tuple[str, ...], w: str, field: str = "auc") -> list[float]:
        return list(by_seed(preset, extra, w, field).values())

    def cell(values: list[float], signed: bool = False) -> str:
        if not values:
            return "–"
        text = _fmt(*_stats(values), signed=signed)
        return text if len(values) == args.seeds else f"{text} (n={len(values)})"

    report: dict = {"size": args.size, "seeds": args.seeds, "epochs": args.epochs, "worlds": {w: WORLDS[w] for w in worlds}}
    lines: list[str] = []
    if args.what in ("presets", "all"):
        names = [n for n in PRESET_NAMES if not args.only or n in args.only]
        lines += ["| preset | " + " | ".join(worlds) + " |", "|---" * (len(worlds) + 1) + "|"]
        report["presets"] = {}
        for n in names:
            report["presets"][n] = {w: {"auc": aucs(n, (), w), "last_auc": aucs(n, (), w, "last_auc"),
                                        "best_epoch": aucs(n, (), w, "best_epoch")} for w in worlds}
            lines.append(f"| `{n}` | " + " | ".join(cell(aucs(n, (), w)) for w in worlds) + " |")
        base = {w: single_feature_auc(paths[w]) for w in worlds}
        report["single_feature"] = base
        lines.append("| best single feature | " + " | ".join(
            f"{max(base[w].values()):.4f} ({max(base[w], key=base[w].get)})" for w in worlds) + " |")
        # What the planted effects are worth: logistic regressions on counts only the generator can make
        # (raylsm.data.effects), e.g. "st" = the short-term target behaviours of the candidate's hidden interest.
        from raylsm.data.effects import ROWS, effect_aucs

        refs = {w: effect_aucs(paths[w]) for w in worlds}
        report["hidden_interest_counts"] = refs
        lines.append("| generator's hidden-interest counts (" + " / ".join(ROWS) + ") | " + " | ".join(
            " / ".join(f"{refs[w][r]:.3f}" for r in ROWS) for w in worlds) + " |")
        lines.append("")
        # Each preset against the plain pyramid, paired by seed: what its mechanism adds in each world.
        if "lap" in names and len(names) > 1:
            lines += ["| preset − `lap` (paired by seed) | " + " | ".join(worlds) + " |", "|---" * (len(worlds) + 1) + "|"]
            report["over_lap"] = {}
            for n in (n for n in names if n != "lap"):
                gains = {w: paired((n, ()), ("lap", ()), w) for w in worlds}
                report["over_lap"][n] = gains
                lines.append(f"| `{n}` | " + " | ".join(cell(gains[w], signed=True) for w in worlds) + " |")
            lines.append("")
    if args.what in ("readings", "all"):
        lines += ["| reading | preset | " + " | ".join(f"Δ AUC {w}" for w in worlds) + " |",
                  "|---|---" + "|---" * len(worlds) + "|"]
        report["readings"] = {}
        for key, preset, values in READINGS:
            if args.only and key not in args.only:
                continue
            for v in values:
                extra = reading_overrides(key, v)
                deltas = {w: paired((preset, extra), (preset, ()), w) for w in worlds}
                report["readings"][f"{key}={v} ({preset})"] = {"preset": preset, **deltas}
                lines.append(f"| `{' '.join(extra)}` | `{preset}` | " + " | ".join(cell(deltas[w], signed=True) for w in worlds) + " |")
    table = "\n".join(lines)
    (out / f"{args.what}-{args.size}.md").write_text(table + "\n")
    print("\n" + table, file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
