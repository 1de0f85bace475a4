"""The readings experiment's report: presets per world, each preset's paired gain over ``lap``, the controls."""

from __future__ import annotations

import json

import pytest

from jobs.experiments import readings


def test_report_pairs_each_preset_with_lap_by_seed_on_every_world_and_control(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(readings, "WORLD_BASE", ["--users", "40", "--rows", "500", "--st-len", "5", "--shards", "1"])
    assert readings.WORLDS["single_off"][-2:] == ["--context-effect", "off"]
    assert readings.WORLDS["cross_off"][-2:] == ["--bridge", "off"]
    aucs = {("lap", "single"): [0.60, 0.58], ("cain", "single"): [0.70, 0.71],
            ("lap", "single_off"): [0.59, 0.60], ("cain", "single_off"): [0.60, 0.59]}
    cells = tmp_path / "cells.jsonl"
    with cells.open("w") as f:
        for (preset, world), values in aucs.items():
            for seed, auc in enumerate(values):
                overrides = [*readings.SIZES["compact"]["set"], f"data.path={tmp_path / world}-ll300", "data.ll_len=300",
                             "train.epochs=4", f"train.seed={seed}"]
                key = readings.cell_key("compact", preset, world, seed, [], [], 4, overrides)
                f.write(json.dumps({"key": key, "preset": preset, "world": world, "seed": seed, "extra": [], "auc": auc,
                                    "last_auc": auc, "best_epoch": 1}) + "\n")
    assert readings.main(["--what", "presets", "--only", "cain", "--only", "lap", "--worlds", "single,single_off",
                          "--seeds", "2", "--out", str(tmp_path), "--report-only"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    gains = report["over_lap"]["cain"]
    assert gains["single"] == pytest.approx([0.10, 0.13]) and gains["single_off"] == pytest.approx([0.01, -0.01])
    assert report["presets"]["lap"]["single"]["auc"] == [0.60, 0.58]
    # The generator's references beside the single features: one AUC per count set, the short-term target
    # sequence empty in one item space (no signal), the lifelong counts above chance.
    from raylsm.data.effects import ROWS, effect_aucs

    refs = report["hidden_interest_counts"]["single"]
    assert list(refs) == list(ROWS) and refs == pytest.approx(effect_aucs(tmp_path / "single-ll300"))
    assert refs["st"] == 0.5 and refs["st+ll+own+nb"] > 0.5
    table = (tmp_path / "presets-compact.md").read_text()
    assert "| `cain` | +0.1150 ± 0.0212 | +0.0000 ± 0.0141 |" in table


def test_a_cells_key_changes_with_the_config_it_resolves_to():
    """A cached cell is reused only for the same model and training config: a changed default (here given as an
    override of the preset's value) is a different key, the same config spelled again is the same key."""
    base = ["data.path=w", "train.seed=0"]
    key = readings.cell_key("compact", "cain", "single", 0, [], [], 4, base)
    assert readings.cell_key("compact", "cain", "single", 0, [], [], 4, list(base)) == key
    assert readings.cell_key("compact", "cain", "single", 0, [], [], 4, ["data.path=elsewhere", "train.seed=0"]) == key
    assert readings.cell_key("compact", "cain", "single", 0, [], [], 4, [*base, "model.match_counts_dropout=0"]) != key
    assert readings.cell_key("compact", "cain", "single", 0, [], [], 4, [*base, "train.lr_decay=0.5"]) != key


def test_every_reading_resolves_on_its_preset():
    """Each alternative the readings experiment trains is a valid job for its preset (a typo or a reading that
    needs a partner key fails here, not minutes into a run), and one that names a partner carries it."""
    from raylsm.train.config import resolve_job

    for key, preset, values in readings.READINGS:
        for v in values:
            resolve_job(preset=preset, overrides=list(readings.reading_overrides(key, v)))
    assert readings.reading_overrides("train.on_plateau", "continue train.early_stop_patience=1") == (
        "train.on_plateau=continue", "train.early_stop_patience=1")
    with pytest.raises(Exception, match="train.on_plateau=rollback: needs train.early_stop_patience"):
        resolve_job(preset="cain", overrides=["train.early_stop_patience=1"])  # the partner is needed
