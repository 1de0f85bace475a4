"""`raylsm bench scale`: its JSON has a ratio per mode and worker count that is the quotient of its own figures.

Tiny sizes (emb 8, 2 steps; two of the three modes, each point spawns its workers): the test checks the
measuring, not the speed.
"""

from __future__ import annotations

import json

import pytest

from raylsm.cli import main

TINY = ["--emb", "8", "--batch", "8", "--ll-len", "12", "--st-len", "4", "--steps", "2", "--warmup", "1",
        "--set", "lap.k1=8", "--set", "lap.k2=4", "--set", "head=[8]", "--no-mlflow"]


@pytest.mark.slow
def test_scale_json_keys_and_ratios_are_its_own_quotients(capsys):
    assert main(["bench", "scale", "--vocab", "50,3000", "--modes", "dense,sharded", "--workers", "1,2", *TINY]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "scale" and out["vocabs"] == [50, 3000]
    keys = {f"{m}/{w}w" for m in ("dense", "sharded") for w in (1, 2)}
    assert set(out["ratio"]) == set(out["cpu_ratio"]) == set(out["memory_ratio"]) == set(out["table_memory_ratio"]) == keys
    rows = {(r["mode"], r["workers"], r["item_vocab"]): r for r in out["results"]}
    assert len(rows) == 8
    for key in keys:
        mode, w = key.split("/")
        lo, hi = rows[(mode, int(w[:-1]), 50)], rows[(mode, int(w[:-1]), 3000)]
        assert out["ratio"][key] == pytest.approx(hi["step_ms"] / lo["step_ms"], rel=1e-2)
        assert out["cpu_ratio"][key] == pytest.approx(hi["step_cpu_ms"] / lo["step_cpu_ms"], rel=1e-2)
        assert out["memory_ratio"][key] == pytest.approx(hi["peak_rss_mb_per_worker"] / lo["peak_rss_mb_per_worker"], rel=1e-2)
        assert hi["table_mb_per_worker"] > lo["table_mb_per_worker"] > 0  # 60x the item rows: more table bytes
    for r in out["results"]:
        assert 0 < r["step_ms"] < 60_000 and 0 < r["step_cpu_ms"]
        assert r["peak_rss_mb_per_worker"] >= r["built_rss_mb_per_worker"] > 50
        sharded = r["mode"] == "sharded" and r["workers"] == 2  # each worker holds half of the item rows
        assert r["item_rows_per_worker"] == (r["item_vocab"] // 2 if sharded else r["item_vocab"])


def test_scale_mistakes_are_one_line_errors(capsys):
    assert main(["bench", "scale", "--modes", "rows", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raylsm: error: --modes")
