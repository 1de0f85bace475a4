"""The LCN paper's Figures 4 and 5 from trained checkpoints: a PNG and a JSON of its numbers each.

Notation: N items per domain, D embedding size, C hidden interests, B test rows, L lifelong
length, H heads, n = ``top_n`` (the paper's 50), K1 / K2 / K the levels' configured sizes.

* **Fig. 4** (LCN §5.2.1, "Representation Quality"): the learned item embeddings of the target
  and the source domain mapped to 2-D (PCA, or t-SNE as in the paper), coloured by the
  synthetic generator's hidden interest, one column per checkpoint (``lap`` = LCN w/o CRP
  next to ``lcn``). An item's embedding is ``e^h = [e_item ‖ e_cate]`` by default (docs/design.md, "Models and readings":
  what CSA's eq. 7 and CRP's cosine use; ``embedding="item"``: the id table alone). The
  paper's claim: without CRP the *target* items cluster about as well, the *source* items
  much worse. Figures of merit (cosine geometry, as CRP's eqs. 3-5):
  the silhouette of the interests within each domain and jointly, and the k-NN interest
  precision (share of an item's k nearest items of the same interest) within each domain and
  across domains (target item -> its k nearest *source* items: what a GSU needs).
* **Fig. 5** (LCN §5.2.2, "Consistency Analyses"): run the final level (FSA for LAP, the ESU for
  SIM/ETA) over the *whole* lifelong sequence and take its top-n by attention score as the real
  set; take each earlier level's top-n (CSA and MSA for LAP, the GSU for SIM/ETA) over the whole
  sequence as a test set; consistency = share of the real set found in the test set. Every score
  comes from the model's own modules (``LAP.levels`` with K1 = K2 = L, ``SIMSoft.retrieve`` with
  K = L, ``esu.scores``). A multi-head level's score of an item is its softmax attention weight
  averaged over the heads. Rows with at most n valid behaviours are left out (every set would be
  the whole sequence); ``chance`` is a random top-n's expected share (n / valid length), and
  ``final_top_mass`` the final level's attention weight on its own top-n (near ``chance`` when
  its weights are flat: then the real set is noise). Ties (repeats of one item score alike at
  CSA and the GSU) are broken as the model's own top-K breaks them. Also
  reported: the share of the real set that the model's own cascade keeps at its configured
  sizes (top-K1, then top-K2; SIM's top-K).

Item interests come from the generator: ``manifest.source.params`` rebuild its deterministic
world (:func:`raylsm.data.synth.build_world`), and the items' categories read from the data are
checked against it, so a generator that no longer reproduces the dataset is an error, not a
wrong picture. ``fig4``/``fig5`` write ``<out>/fig{4,5}.{png,json}`` and, given an MLflow run
id, log both under the run's ``figures/`` artifacts. Fig. 5 is in :mod:`raylsm.experiments.consistency`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from raylsm.config import ConfigError
from raylsm.data.contract import Manifest, read_manifest, shard_files
from raylsm.train.checkpoint import model_from_checkpoint

DOMAIN_COLUMNS = {
    "target": (("item_id", "item_cate"), ("st_tgt_items", "st_tgt_cates")),
    "source": (("ll_items", "ll_cates"), ("st_src_items", "st_src_cates")),
}
CONSISTENCY_MODELS = ("lap", "sim_soft", "eta")  # lifelong modules whose levels Fig. 5 can score


@dataclass
class Loaded:
    """A checkpoint's model (eval mode, CPU) and what the figures label it with."""

    path: str
    model: nn.Module
    meta: dict
    label: str

    @property
    def preset(self) -> str:
        return self.meta["job"]["preset"]

    @property
    def crp(self) -> bool:
        return bool(self.meta["job"]["model"]["crp"]["enabled"])

    @property
    def lifelong(self) -> str:
        return self.meta["job"]["model"]["lifelong"]


def load_checkpoints(paths: Sequence[str], manifest: Manifest, data: str) -> list[Loaded]:
    """Load every checkpoint and check that ``data`` fits its vocabulary; labels are unique."""
    if not paths:
        raise ConfigError("--checkpoints: give at least one checkpoint directory")
    out = []
    for path in paths:
        model, meta = model_from_checkpoint(path)
        vocab = meta["vocab"]
        for key in ("item", "cate", "ctx", "gap", "user"):
            if manifest.vocab[key] > vocab[key]:
                raise ConfigError(f"{data}/manifest.json: vocab.{key} = {manifest.vocab[key]} exceeds the vocabulary "
                                  f"of checkpoint {path} ({vocab[key]}): not the dataset it was trained on")
        if list(manifest.profile_fields) != list(vocab["profile"]):
            raise ConfigError(f"{data}/manifest.json: profile fields {manifest.profile_fields} differ from "
                              f"checkpoint {path}'s {list(vocab['profile'])}")
        out.append(Loaded(path, model.eval(), meta, meta["job"]["preset"]))
    labels = [c.label for c in out]
    for c in out:
        if labels.count(c.label) > 1:
            c.label = f"{c.label} ({Path(c.path).name})"
    return out


# ----------------------------------------------------------------------------- Fig. 4: items


def hidden_interests(data: str, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """``(item_interest, item_cate)`` tables (index = item id) of the synthetic world behind ``data``."""
    from raylsm.data.synth import GENERATOR, SynthConfig, build_world

    source = manifest.source or {}
    if source.get("generator") != GENERATOR:
        raise ConfigError(f"{data}/manifest.json: source.generator is {source.get('generator')!r}; item interests "
                          f"are known for datasets of {GENERATOR} only")
    names = {f.name for f in fields(SynthConfig)}
    params = {k: v for k, v in (source.get("params") or {}).items() if k in names}
    params["cache_elems"] = 0  # the item tables only: no timelines are materialised
    world = build_world(SynthConfig(**params))
    return world.item_interest, world.item_cate


def domain_items(data: str, item_cate: np.ndarray, max_rows: int = 20_000) -> dict[str, np.ndarray]:
    """Occurrence counts (index = item id) of each domain's items in the first ``max_rows`` train rows.

    Target: candidates and ``st_tgt``; source: ``ll`` and ``st_src``. Each (item, category) pair
    read is checked against the generator's ``item_cate`` table.
    """
    counts = {d: np.zeros(len(item_cate), np.int64) for d in DOMAIN_COLUMNS}
    columns = [c for pairs in DOMAIN_COLUMNS.values() for pair in pairs for c in pair]
    rows = 0
    for path in shard_files(data, "train"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns):
            batch = batch.slice(0, max_rows - rows)
            rows += batch.num_rows
            for domain, pairs in DOMAIN_COLUMNS.items():
                for item_col, cate_col in pairs:
                    items, cates = batch.column(item_col), batch.column(cate_col)
                    if pa.types.is_list(items.type):
                        items, cates = pc.list_flatten(items), pc.list_flatten(cates)
                    items = np.asarray(items, np.int64)
                    cates = np.asarray(cates, np.int64)
                    if len(items) and (items.max() >= len(item_cate) or (item_cate[items] != cates).any()):
                        raise ConfigError(f"{path}: column {cate_col} disagrees with the generator's world rebuilt "
                                          "from manifest.json (regenerate the dataset with this version)")
                    counts[domain] += np.bincount(items, minlength=len(item_cate))
            if rows >= max_rows:
                break
        if rows >= max_rows:
            break
    for c in counts.values():
        c[0] = 0  # padding
    return counts


def pick_items(counts: np.ndarray, max_items: int) -> np.ndarray:
    """The ``max_items`` most frequent items (ties: smaller id first); their embeddings saw the most gradient."""
    ids = np.flatnonzero(counts)
    order = np.lexsort((ids, -counts[ids]))
    return np.sort(ids[order[:max_items]])


def embed_items(model: nn.Module, ids: np.ndarray, item_cate: np.ndarray, part: str = "behaviour") -> np.ndarray:
    """An item's ``e^h = [e_item ‖ e_cate]`` (``part = behaviour``: what CSA's eq. 7 and CRP's cosine see), or ``e_item``: (N, D)."""
    f = model.features
    t = torch.as_tensor(ids, dtype=torch.int64)
    with torch.no_grad():
        x = f.lookup("item", t) if part == "item" else f.behaviour(t, torch.as_tensor(item_cate[ids], dtype=torch.int64))
    return x.float().numpy()


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of ``labels`` under cosine distance (``1 - cos``); a singleton cluster scores 0."""
    xn = normalise(x)
    dist = np.clip(1.0 - xn @ xn.T, 0.0, 2.0)  # (N, N)
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        return float("nan")
    onehot = np.eye(len(classes))[y]  # (N, C)
    size = onehot.sum(0)  # (C,)
    mean_to = (dist @ onehot) / size  # (N, C) mean distance to each class (own class includes self, d = 0)
    own = size[y]
    a = mean_to[np.arange(len(y)), y] * own / np.maximum(own - 1, 1)  # exclude self
    mean_to[np.arange(len(y)), y] = np.inf
    b = mean_to.min(1)
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def knn_precision(query: np.ndarray, q_labels: np.ndarray, base: np.ndarray, b_labels: np.ndarray, k: int,
                  same_set: bool = False) -> float:
    """Mean share of each query's ``k`` nearest base items (cosine) with the query's label; ``same_set`` skips self."""
    sim = normalise(query) @ normalise(base).T  # (Nq, Nb)
    if same_set:
        np.fill_diagonal(sim, -np.inf)
    k = min(k, base.shape[0] - int(same_set))
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (Nq, k)
    return float((b_labels[nearest] == q_labels[:, None]).mean())


def chance_precision(q_labels: np.ndarray, b_labels: np.ndarray) -> float:
    """k-NN precision of a random neighbour: Σ_c P_query(c) · P_base(c)."""
    c = max(q_labels.max(), b_labels.max()) + 1
    return float(np.bincount(q_labels, minlength=c) @ np.bincount(b_labels, minlength=c) / (len(q_labels) * len(b_labels)))


def separation(tgt: np.ndarray, tgt_y: np.ndarray, src: np.ndarray, src_y: np.ndarray, k: int) -> dict[str, float]:
    """Fig. 4's figures of merit: silhouettes and k-NN interest precisions within and across the domains."""
    return {
        "silhouette_target": silhouette(tgt, tgt_y),
        "silhouette_source": silhouette(src, src_y),
        "silhouette_joint": silhouette(np.concatenate([tgt, src]), np.concatenate([tgt_y, src_y])),
        "knn_target": knn_precision(tgt, tgt_y, tgt, tgt_y, k, same_set=True),
        "knn_source": knn_precision(src, src_y, src, src_y, k, same_set=True),
        "knn_cross": knn_precision(tgt, tgt_y, src, src_y, k),
    }


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2): PCA (numpy SVD of the centred matrix, sign fixed) or t-SNE (scikit-learn)."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(2, init="pca", random_state=seed, perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(x)
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:2] * np.sign(vt[:2, :1] + 1e-12)  # deterministic orientation
    return centred @ vt.T


def _colours(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "gist_ncar"]
    return [cmap(i / max(n - 1, 1)) if n > 20 else cmap(i) for i in range(n)]


def plot_fig4(path: Path, panels: list[dict], n_interests: int, projection: str) -> None:
    """Rows: target, source domain; one column per checkpoint; points coloured by hidden interest."""
    from matplotlib.figure import Figure

    colours = np.array(_colours(n_interests))
    fig = Figure(figsize=(4.2 * len(panels), 8.0), layout="constrained")
    axes = np.asarray(fig.subplots(2, len(panels), squeeze=False))
    for j, p in enumerate(panels):
        for i, domain in enumerate(("target", "source")):
            ax = axes[i, j]
            xy, y = p[f"{domain}_xy"], p[f"{domain}_y"]
            ax.scatter(xy[:, 0], xy[:, 1], c=colours[y], s=6, linewidths=0)
            m = p["metrics"]
            ax.set_title(f"{p['label']} — {domain}\nsilhouette {m[f'silhouette_{domain}']:.3f}, "
                         f"{m['k']}-NN {m[f'knn_{domain}']:.3f}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1, j].set_xlabel(f"cross-domain {p['metrics']['k']}-NN precision {p['metrics']['knn_cross']:.3f}", fontsize=9)
    fig.suptitle(f"LCN Fig. 4: item embeddings ({projection.upper()}), coloured by hidden interest", fontsize=11)
    fig.savefig(path, dpi=110)


def fig4(checkpoints: Sequence[str], data: str, out: str, run_id: str | None = None, tracking_uri: str | None = None,
         max_items: int = 1000, k: int = 10, projection: str = "pca", embedding: str = "behaviour", max_rows: int = 20_000,
         seed: int = 0) -> dict:
    """Fig. 4: embedding maps and separation scores of ``checkpoints`` on ``data``'s items -> ``<out>/fig4.{png,json}``."""
    if max_items < 2 or k < 1 or max_rows < 1:
        raise ConfigError(f"--max-items/--k/--max-rows: must be >= 2/1/1, got {max_items}/{k}/{max_rows}")
    if projection not in ("pca", "tsne") or embedding not in ("item", "behaviour"):
        raise ConfigError(f"--projection/--embedding: pca|tsne / item|behaviour, got {projection!r}/{embedding!r}")
    uri = tracking_target(run_id, tracking_uri)
    manifest = read_manifest(data)
    loaded = load_checkpoints(checkpoints, manifest, data)
    interest, item_cate = hidden_interests(data, manifest)
    counts = domain_items(data, item_cate, max_rows)
    ids = {d: pick_items(c, max_items) for d, c in counts.items()}
    for d, v in ids.items():
        if len(v) < 2:
            raise ConfigError(f"{data}: the train split holds {len(v)} {d}-domain item(s); Fig. 4 needs at least 2")
    y = {d: interest[v] for d, v in ids.items()}
    n_interests = int(max(y["target"].max(), y["source"].max())) + 1
    panels, models = [], []
    for c in loaded:
        x = {d: embed_items(c.model, v, item_cate, embedding) for d, v in ids.items()}
        metrics = {"k": k, **separation(x["target"], y["target"], x["source"], y["source"], k)}
        xy = project_2d(normalise(np.concatenate([x["target"], x["source"]])), projection, seed)
        nt = len(ids["target"])
        panels.append({"label": c.label, "metrics": metrics, "target_xy": xy[:nt], "source_xy": xy[nt:],
                       "target_y": y["target"], "source_y": y["source"]})
        models.append({"checkpoint": c.path, "label": c.label, "preset": c.preset, "crp": c.crp, **metrics})
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    png = outdir / "fig4.png"
    plot_fig4(png, panels, n_interests, projection)
    result = {
        "figure": "fig4", "paper": "LCN §5.2.1 Representation Quality, Figure 4", "data": str(data),
        "projection": projection, "embedding": embedding, "interests": n_interests,
        "items": {d: len(v) for d, v in ids.items()},
        "chance": {"knn_target": chance_precision(y["target"], y["target"]),
                   "knn_source": chance_precision(y["source"], y["source"]),
                   "knn_cross": chance_precision(y["target"], y["source"])},
        "models": models,
    }
    return finish(result, png, outdir / "fig4.json", run_id, uri)


# ----------------------------------------------------------------------------- output


def tracking_target(run_id: str | None, tracking_uri: str | None) -> str | None:
    """The tracking URI to log to (None: no logging); checks the store and the run before any work is done."""
    from raylsm.train.config import default_tracking_uri
    from raylsm.train.tracking import client as tracking_client, check_store, redact_uri

    if not run_id:
        if tracking_uri:
            raise ConfigError("--tracking-uri: give --run-id too (the MLflow run to log the figure to)")
        return None
    uri = tracking_uri or default_tracking_uri()
    check_store(uri)
    try:
        tracking_client(uri).get_run(run_id)
    except Exception:
        raise ConfigError(f"--run-id {run_id}: no such MLflow run in {redact_uri(uri)}") from None
    return uri


def log_artifacts(paths: Sequence[Path], run_id: str, tracking_uri: str) -> list[str]:
    """Log ``paths`` under ``figures/`` of MLflow run ``run_id`` (client API); returns the artifact paths."""
    from raylsm.train.tracking import client as tracking_client

    client = tracking_client(tracking_uri)
    for p in paths:
        client.log_artifact(run_id, str(p), artifact_path="figures")
    return [f"figures/{Path(p).name}" for p in paths]


def finish(result: dict, png: Path, json_path: Path, run_id: str | None, uri: str | None) -> dict:
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    result = {**result, "png": str(png), "json": str(json_path), "mlflow_run_id": run_id}
    if uri is not None:
        result["artifacts"] = log_artifacts([png, json_path], run_id, uri)
    return result


__all__ = ["fig4", "separation", "silhouette", "knn_precision", "load_checkpoints", "log_artifacts", "tracking_target"]
