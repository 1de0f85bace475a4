"""``raylsm bench``: the figures of the input pipeline, the training step and the Ray run, each against a reference.

Subcommands (the Ray-side ones live in :mod:`raylsm.bench.ray_runs` and :mod:`raylsm.bench.startup`; shared helpers in :mod:`raylsm.bench.common`, the in-process runs in :mod:`raylsm.bench.local`, the command line in :mod:`raylsm.bench.cli`):

=========  ====================================================================  ===========================================
name       figure                                                                ``ratio``
=========  ====================================================================  ===========================================
ingest     rows/s of the Ray Data path with 1..N CPUs and of the one-process      Ray rows/s with the most CPUs ÷ (N × one
           reader (``iter_local_batches``), batches handed to the device         process)
step       train and inference step time per model, length and dtype            step time at the last length ÷ at the first
train      samples/s of a short Ray Train run and of the step alone              Ray ÷ step-only
latency    one user scored against C candidates (the sequence tensors shared)    first model ÷ ``sim_soft``
memory     peak RSS (CPU) / peak GPU memory of one training process per model   first model ÷ ``lap``
startup    seconds from ``raylsm train`` starting to its first training batch   Ray ÷ the in-process path
scale      step time and per-worker memory vs item vocabulary and                per mode and workers: step at the
           embedding mode, 1 and 2 workers (:mod:`raylsm.bench.scale`)           largest vocabulary ÷ at the smallest
stream     per-worker RSS over a bounded run streaming a dataset through Ray    RSS at the end ÷ after the warm-up
           Data (:mod:`raylsm.bench.stream`)                                     (largest over the workers)
suite      every part above in one command within ``--budget`` s, each in a      per part: that part's own ``ratio``
           child process; JSON and Markdown reports (:mod:`raylsm.bench.suite`)
=========  ====================================================================  ===========================================

Every figure is the median of repeats, taken in the same run as its reference (the machine
may be shared and noisy). Progress goes to stderr; the result is the last stdout line and is
also logged to the MLflow experiment ``bench`` (params: the options; metrics: the numeric
figures, flattened; the JSON as an artifact). Model timings run in a spawned process per
(model, length), so peak RSS is that model's own. ``startup`` also times Ray's own floor in the
same run: a bare ``TorchTrainer`` streaming ``ray.data.range`` on a fresh local cluster
(``ray_floor_seconds``; ``over_floor`` = ours ÷ it).
"""
