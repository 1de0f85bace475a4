"""Ray Data shards as torch batches on the worker's device, with the first epoch's stream started early and
the first-batch mark that ``raylsm bench startup`` reads."""

from __future__ import annotations

import os
import threading
import time
from typing import Iterable, Iterator

import torch

def torch_batches(shard, batch_size: int, device: torch.device, shuffle_buffer: int = 0, seed: int | None = None,
                   prefetch: int = 2, pin_memory: bool = True, first_batch_file: str | None = None) -> Iterator:
    """Batches of a Ray Data shard as tensors on ``device``.

    Rows arrive collated and already shuffled by the read tasks (``raylsm.data.pipeline``), so
    the consumer only slices blocks into batches and hands them over; ``prefetch`` batches are
    prepared ahead in Ray's background thread, in pinned memory when the device is CUDA (so the
    host-to-device copy is asynchronous). ``shuffle_buffer`` > 0 adds Ray's local shuffle buffer
    (a copy of every row in this process: only for extra mixing across shards).
    """
    kwargs = {}
    if shuffle_buffer:
        kwargs = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed}
    batches = shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=False, prefetch_batches=prefetch,
                                       pin_memory=pin_memory and device.type == "cuda", **kwargs)
    return mark_first_batch(batches, first_batch_file) if first_batch_file else batches


# `raylsm bench startup`: where to note when the first batch arrives. The driver reads it and passes it in
# the train loop's config, so it reaches the workers on an already running cluster too (whose worker
# processes do not inherit the driver's environment).
FIRST_BATCH_FILE = "RAYLSM_FIRST_BATCH_FILE"


def mark_first_batch(batches: Iterable, path: str) -> Iterator:
    """Pass ``batches`` through; write the wall-clock time the first one arrived to ``path`` (once)."""
    first = True
    for batch in batches:
        if first:
            first = False
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(repr(time.time()))
        yield batch


class FirstFetched:
    """Iterate ``batches``, its first item already being fetched in a background thread.

    The worker starts its first epoch's data stream before it builds the model, loads the MLflow
    logger and starts the system-metrics monitor, so Ray Data's split coordinator and read tasks
    start while the worker sets up (they otherwise start at the first ``next``). The items and
    their order are the iterator's own; an error raised while fetching is raised on iteration.
    """

    def __init__(self, batches: Iterable):
        self._it = iter(batches)
        self._first: tuple = ()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="raylsm-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = (next(self._it),)
        except StopIteration:
            pass
        except BaseException as e:  # re-raised in the consuming thread
            self._error = e

    def __iter__(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._it
