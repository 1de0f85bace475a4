"""Paper-style tables from a grid search: one row per cell, mean ± spread over the seeds.

A cell is a trial's config without ``train.seed``; its figures are the children's headline
metrics (test metrics of the checkpoint chosen on validation). Spread = the sample standard
deviation over the seeds (0 with one seed); ``n`` says how many seeds a cell has.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

METRICS = ("auc", "gauc", "logloss")


def cell_rows(children: list[dict], metrics: tuple[str, ...] = METRICS) -> list[dict]:
    """``children``: [{"config": {...}, "metrics": {...}}] -> rows with ``<m>_mean``/``<m>_std`` per metric."""
    groups: dict[str, list[dict]] = defaultdict(list)
    labels: dict[str, dict] = {}
    for child in children:
        cell = {k: v for k, v in child["config"].items() if k != "train.seed"}
        key = json.dumps(cell, sort_keys=True)
        groups[key].append(child["metrics"])
        labels[key] = cell
    rows = []
    for key, runs in groups.items():
        row: dict = {"cell": " ".join(f"{k.split('.')[-1]}={v}" for k, v in labels[key].items()), "n": len(runs)}
        for m in metrics:
            values = [r[m] for r in runs if isinstance(r.get(m), (int, float)) and r[m] == r[m]]
            mean = sum(values) / len(values) if values else float("nan")
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        rows.append(row)
    return rows


def markdown(rows: list[dict], metrics: tuple[str, ...] = METRICS) -> str:
    head = "| cell | n | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for r in rows:
        cells = [f"{r[f'{m}_mean']:.4f} ± {r[f'{m}_std']:.4f}" for m in metrics]
        lines.append(f"| {r['cell']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def search_table(tracking_uri: str, parent_run_id: str) -> list[dict]:
    """Rows of the finished children of a search (children ASHA stopped have no headline and are left out)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000)
    children = [{"config": json.loads(r.data.tags.get("raylsm.trial_config", "{}")), "metrics": r.data.metrics}
                for r in runs if r.info.status == "FINISHED"]
    return cell_rows(children)


def log_table(tracking_uri: str, parent_run_id: str, rows: list[dict], name: str = "table") -> None:
    import csv
    import io

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_text(parent_run_id, markdown(rows) + "\n", f"{name}.md")
    if rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        client.log_text(parent_run_id, buf.getvalue(), f"{name}.csv")
