"""Job config: which model, which data, how to train, where to track.

A job YAML (``jobs/*.yaml``) looks like::

    preset: lcn              # a model preset (raylsm.models.config.PRESETS)
    model: {lap: {k1: 200}}  # overrides merged over the preset
    data: {path: data/synth, ll_len: 500}
    train: {epochs: 2, batch_size: 512, workers: 1}
    mlflow: {experiment: raylsm}

:func:`resolve_job` merges preset, file, ``--set`` overrides and CLI flags into
one validated :class:`JobConfig`; unknown keys raise, naming the dotted key.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raylsm.config import ConfigError, apply_overrides, from_dict, load_yaml, merge, set_path, to_dict
from raylsm.models.config import PRESETS, ModelConfig

# Training readings that belong to a preset (merged under the job file's ``train`` block): the papers'
# literal presets keep the papers' learning rate. ``lap``, ``din`` and the retrieval baselines peak after their
# first epoch and then over-fit; at lr_decay 0.1 their later epochs fine-tune instead (no loss at the chosen epoch
# beyond the seed spread; the last epoch 0.000-0.007 behind it instead of 0.010-0.021 at the compact size; with
# their item-id dropout within 0.001 at the compact and the larger size), where ``lcn`` and ``cain`` keep learning
# for 2-4 epochs at the full rate and lose 0.01-0.11 with it (docs/experiments.md, "Readings"). ``cain`` keeps the full rate until an epoch without a better
# validation AUC, then goes back to the best epoch and fine-tunes it at a tenth of the rate (on_plateau=rollback,
# patience 2 so the run goes on after it): its last epoch no longer trails the chosen one cross-domain. ``lcn`` the
# same: where it peaks at its second epoch (the larger size, cross-domain) the fine-tuned epoch after the rollback
# is its best, and elsewhere it changes nothing (a run that peaks later ends at the cap with the same epochs).
# A rollback after the budget's last epoch brings its fine-tune epoch (rollback_finetune): every lcn run then ends
# at its chosen epoch, and the chosen epoch is never worse.
PRESET_TRAIN: dict[str, dict] = {"lcn_paper": {"lr": 1e-3}, "cain_paper": {"lr": 1e-3},
                                 **{name: {"lr_decay": 0.1} for name in ("din", "sim_soft", "eta", "sdim", "twin")},
                                 # with its item-id dropout, lap's first epoch learns the categories at 1e-2
                                 "lap": {"lr_decay": 0.1, "lr": 1e-2},
                                 **{name: {"on_plateau": "rollback", "early_stop_patience": 2}
                                    for name in ("lcn", "cain")}}


@dataclass
class DataConfig:
    path: str = "data/synth"
    st_len: int = 50
    ll_len: int = 500
    # Validation split (chooses the best checkpoint, drives early stopping and the tuner's metric).
    # A dataset whose manifest lists a "val" split uses it; otherwise the latest ``val_fraction``
    # of the train split by impression time is held out. 0 = no validation split: the last epoch's
    # checkpoint is the one kept and reported (test metrics never choose anything).
    val_fraction: float = 0.1
    # Input pipeline (raylsm.data.pipeline): one read+collate task per shard, rows shuffled in the task.
    shuffle: bool = True  # seeded (train.seed) shard order and in-block row order, reseeded every epoch
    narrow_ids: bool = True  # ids shipped in the narrowest dtype the vocabulary allows, widened on the device
    block_rows: int = 8192  # rows per collated block (the in-task shuffle mixes this many rows)
    task_cpus: float = 0.5  # CPUs each read task asks Ray for (<= the 0.5 CPU a training layout leaves)
    read_concurrency: int = 0  # at most this many read tasks at once; 0 = as many as Ray Data's CPUs allow
    # Ray Data's per-operator resource reservation (DataContext.op_resource_reservation_enabled). The pipeline
    # is one operator, so reserving splits nothing useful, and the reservation's budget admits one read task at
    # a time for the first second or so of every execution (every epoch): off, 2 CPUs read 1.4x faster here.
    op_reservation: bool = False

    def validate(self) -> None:
        if self.st_len < 1 or self.ll_len < 1:
            raise ConfigError(f"data.st_len/ll_len: must be >= 1, got {self.st_len}/{self.ll_len}")
        if self.block_rows < 1:
            raise ConfigError(f"data.block_rows: must be >= 1, got {self.block_rows}")
        if self.task_cpus <= 0:
            raise ConfigError(f"data.task_cpus: must be > 0, got {self.task_cpus}")
        if self.read_concurrency < 0:
            raise ConfigError(f"data.read_concurrency: must be >= 0 (0 = no cap), got {self.read_concurrency}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")


@dataclass
class TrainConfig:
    # Measured (docs/experiments.md): at lr 3e-3 the presets peak within 1-3 epochs and then overfit, so
    # 4 epochs with early stopping after 1 epoch without a better validation AUC; the kept checkpoint is
    # always the validation-chosen one. The papers' lr 1e-3 is the *_paper presets' (PRESET_TRAIN).
    epochs: int = 4
    batch_size: int = 512
    eval_batch_size: int = 2048
    lr: float = 3e-3
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction (e.g. 0.5) lets trials share a GPU
    cpus_per_worker: float = 1.0
    bf16: bool = False  # bf16 autocast on GPU
    max_failures: int = field(default=0, metadata={"signed": True})  # -1 = retry forever
    keep_checkpoints: int = 2  # best N by validation AUC (the latest N without a validation split)
    early_stop_patience: int = 1  # stop after N epochs without a better validation AUC; 0 = off
    # The learning rate is multiplied by this after every epoch (1 = constant, the papers'): a lower rate in
    # the epochs after the presets' early peak. Saved with the optimizer, so a resumed run continues it.
    lr_decay: float = 1.0
    # What an epoch without a better validation AUC leaves behind: continue = its weights, training goes on from
    # them (until early stopping); rollback = the best epoch's weights and optimizer state are restored and the
    # rate multiplied by plateau_lr_factor, so the next epoch fine-tunes the best model instead of the over-fitted
    # one (needs early_stop_patience 0 or >= 2). Kept in memory (a CPU copy of this worker's model and optimizer
    # state); a worker restarted from a checkpoint that is not the best lowers the rate without restoring (at
    # once when the checkpoint's epoch is the one without a better validation AUC: raylsm.train.step.resume_plateau).
    on_plateau: Literal["continue", "rollback"] = "continue"
    plateau_lr_factor: float = 0.1
    # With rollback: a rollback after the budget's last epoch is followed by one more epoch, the fine-tune of the
    # restored best state at the lowered rate, so no run ends on the over-fitted epoch (the budget grows by at most
    # one epoch). false = the run ends at the budget with the best epoch's weights.
    rollback_finetune: bool = True
    # Decoupled weight decay (AdamW's): every step each parameter is multiplied by (1 - lr * weight_decay) before
    # Adam's update; 0 = none (the papers'). With row-sparse tables only the rows a step touched decay.
    weight_decay: float = 0.0
    shuffle_buffer: int = 0  # local shuffle buffer (rows) per worker on top of the in-task shuffle; 0 = off
    max_steps_per_epoch: int = 0  # 0 = the whole split
    prefetch_batches: int = 2  # batches each worker prepares ahead of the step (Ray's background thread)
    pin_memory: bool = True  # with a GPU: batches in pinned memory, copied to the device asynchronously
    compile: bool = False  # torch.compile the model (in place; same checkpoints)
    fused_adam: bool = True  # Adam's fused kernel: the same update in one pass per tensor (CPU: 17 -> 2.3 ms a step for 2 M params)
    # dense: Adam over whole tables (DDP all-reduces their full gradient); sparse: row-sparse table gradients,
    # Adam on the touched rows only, tables out of DDP (their rows exchanged); auto: sparse when a table has
    # 100k+ rows or is row-sharded, else dense (small vocabularies train exactly as before). raylsm.train.optim.
    embedding_update: Literal["auto", "dense", "sparse"] = "auto"
    # none: every worker holds every table whole; row: with 2+ workers the item table (and any table of 100k+
    # rows) is split by rows, id i on worker i % W, looked up with all_to_all (raylsm.models.sharded_embedding).
    # Trains row-sparse (embedding_update auto or sparse; the shards' row-sparse gradients go to row-wise Adam).
    embedding_sharding: Literal["none", "row"] = "none"

    def validate(self) -> None:
        if self.prefetch_batches < 0:
            raise ConfigError(f"train.prefetch_batches: must be >= 0, got {self.prefetch_batches}")
        for name in ("epochs", "batch_size", "eval_batch_size", "workers", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"train.lr_decay: must be in (0, 1] (1 = constant), got {self.lr_decay}")
        if not 0.0 < self.plateau_lr_factor <= 1.0:
            raise ConfigError(f"train.plateau_lr_factor: must be in (0, 1], got {self.plateau_lr_factor}")
        if self.on_plateau == "rollback" and self.early_stop_patience == 1:
            raise ConfigError("train.on_plateau=rollback: needs train.early_stop_patience 0 or >= 2 (at 1 the run stops "
                              "at the first epoch without a better validation AUC, before any rollback; "
                              "train.on_plateau=continue with it stops there)")
        if not 0.0 <= self.weight_decay < 1.0 / self.lr:
            raise ConfigError(f"train.weight_decay: must be in [0, 1/train.lr) (0 = none), got {self.weight_decay}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"train.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and not 0.0 < self.gpus_per_worker <= 1.0 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ConfigError(f"train.gpus_per_worker: must be a fraction in (0, 1] or a whole number, got {self.gpus_per_worker}")
        if self.gpus_per_worker <= 0:
            raise ConfigError(f"train.gpus_per_worker: must be > 0, got {self.gpus_per_worker}")
        if self.early_stop_patience < 0:
            raise ConfigError(f"train.early_stop_patience: must be >= 0 (0 = off), got {self.early_stop_patience}")
        if self.embedding_sharding == "row" and self.embedding_update == "dense":
            raise ConfigError("train.embedding_sharding: row needs train.embedding_update=sparse or auto, got dense")
        if self.embedding_sharding == "row":
            self.embedding_update = "sparse"  # auto: a sharded table trains row-sparse on any worker count
        if self.max_failures < -1:
            raise ConfigError(f"train.max_failures: must be >= -1 (-1 = retry forever), got {self.max_failures}")


@dataclass
class TrackingConfig:
    experiment: str = "raylsm"
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    run_name: str = ""


@dataclass
class JobConfig:
    preset: str = "lcn"
    name: str = ""  # Ray Train run name; "" = derived from preset and time. Same name + storage = resume.
    storage: str = "runs"  # Ray Train storage_path (checkpoints)
    resume_from: str = ""  # a checkpoint directory to continue training from
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)


# The command line's job flags (``raylsm train`` / ``raylsm tune`` options, by argparse name) and the config
# key each sets; one map for every command (docs/design.md, "Command line").
FLAG_KEYS = {
    "data": "data.path",
    "epochs": "train.epochs",
    "workers": "train.workers",
    "gpu": "train.use_gpu",
    "experiment": "mlflow.experiment",
    "tracking_uri": "mlflow.tracking_uri",
    "storage": "storage",
    "name": "name",
    "max_failures": "train.max_failures",
    "resume_from": "resume_from",
}


def job_flags(**values: Any) -> dict[str, Any]:
    """Flag values (argparse names, None = not given) as the config keys :func:`resolve_job` sets; ``gpu`` is a switch."""
    return {FLAG_KEYS[k]: (True if v else None) if k == "gpu" else v for k, v in values.items()}


def resolve_job(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> JobConfig:
    """Merge preset defaults <- YAML file <- CLI flags <- ``--set`` overrides into a JobConfig."""
    raw: dict = load_yaml(config_file) if config_file else {}
    if preset:
        raw["preset"] = preset
    name = raw.get("preset", JobConfig.preset)
    if name not in PRESETS:
        where = f"{config_file}: key 'preset'" if config_file and not preset else "--model"
        raise ConfigError(f"{where}: unknown model {name!r} (choose from {', '.join(sorted(PRESETS))})")
    raw["model"] = merge(copy.deepcopy(PRESETS[name]), raw.get("model") or {})  # overrides must not edit the preset
    raw["train"] = merge(copy.deepcopy(PRESET_TRAIN.get(name, {})), raw.get("train") or {})
    for dotted, value in (flags or {}).items():
        if value is not None:
            set_path(raw, dotted.split("."), value, JobConfig)
    apply_overrides(raw, overrides or [], JobConfig)
    return from_dict(JobConfig, raw)


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite store in the working directory (docs/design.md, "MLflow record" and "Ray and MLflow notes")."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def job_to_dict(job: JobConfig) -> dict:
    return to_dict(job)
