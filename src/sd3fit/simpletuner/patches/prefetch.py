"""Cached batches read ahead of the step (`prefetch_batches: true`, an sd3fit speed key).

Upstream (simpletuner 4.10.1) reads each step's cached latents and text embeddings from disk (`torch.load` of
compressed files: tens of milliseconds of host time per step at 1024 px) in the training loop itself, while the
GPU waits. Its own `dataloader_prefetch` option moves that into a background thread (`BatchFetcher`), and
`dataloader_prefetch_device_threshold_mb` has the thread copy each batch to the GPU on a side stream. Both are off
by default; this key turns them on with a short queue (each SD3 batch is a few MiB) and, on CUDA, the copy to the
GPU, setting upstream's options where the preset leaves them unset.

Upstream's thread polls: when the queue is full it sleeps half a second before looking again, and the step waiting
for a batch spins on `queue.empty()`, holding the interpreter lock the fetching thread needs. A step shorter than
a queue's worth of half a second (4 batches: 0.125 s; the 24 GB LoRA preset's is 0.09 s on an H200) then empties
the queue while the thread sleeps and waits for it: about 1 s every few steps (measured: p90 1.2 s against a
median of 0.09 s). `apply` replaces the two methods of upstream's `BatchFetcher` with blocking ones: the thread
waits on the queue's own condition and wakes as soon as a step takes a batch, and the step sleeps until one is
there. What is fetched, in which order, and where it is copied stay upstream's.

Reading ahead also made a seed's run unrepeatable (two runs of one preset on the tiny model differed from their
first or second step), as the fetching thread drew from generators the step's thread uses too:
- upstream's sampler (`simpletuner.helpers.multiaspect.sampler`) picks buckets and images with Python's global
  `random`, which the step's thread saves and restores around every torch.compile (dynamo keeps Python's random
  state unchanged by tracing), so which images a step got depended on timing;
- every batch starts a torch DataLoader iterator, which draws a seed for its workers from torch's global generator
  (`loader.generator` when set), the one the step draws its noise and timesteps from, so the step's noise depended
  on how far ahead the thread had read.
Here the fetching thread draws from its own `random.Random`, a copy of the global state taken in the step's thread
when the run's first fetcher starts (continued by the next epochs' fetchers), and the data loaders it iterates get a
`torch.Generator` of their own, seeded from the run's torch seed: the same draws in the same order on every run. The
collate's caption dropout draws from NumPy's global state in the fetching thread, which nothing else draws from
during training.
"""

from __future__ import annotations

import queue
import random
import threading

import torch

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
QUEUE = 4  # batches read ahead; upstream's default of 10 only holds more memory
DEVICE_THRESHOLD_MB = 1  # every SD3 batch is larger: all of them go to the GPU ahead of their step
STOP_POLL_S = 0.2  # a waiting thread looks this often whether the run asked it to stop
MODULE = "simpletuner.helpers.data_backend.runtime.batch_fetcher"
SAMPLER = "simpletuner.helpers.multiaspect.sampler"  # draws with the `random` module it imported
METHODS = ("start_fetching", "fetch_responses", "next_response")  # BatchFetcher's, replaced

_upstream: dict | None = None  # BatchFetcher's own methods while ours are in place
_thread = threading.local()  # `random`: the fetching thread's own generator
_fetch_random: random.Random | None = None  # that generator, continued from one epoch's fetcher to the next
_fetch_generator: torch.Generator | None = None  # the data loaders' own, likewise


class _ThreadRandom:
    """Stands for the `random` module in upstream's sampler: the fetching thread's own generator there, the
    module's global one everywhere else."""

    def __getattr__(self, name):
        return getattr(getattr(_thread, "random", None) or random, name)


THREAD_RANDOM = _ThreadRandom()


def options(options: dict, on: bool, cuda: bool) -> dict:
    """`options` with upstream's prefetch settings added when `on` (those the preset sets itself are kept)."""
    if not on:
        return options
    compat.require(CHECKED_AGAINST, __name__)
    from simpletuner.helpers.data_backend.runtime import batch_fetcher

    if not hasattr(batch_fetcher, "BatchFetcher"):
        raise RuntimeError(f"{__name__}: SimpleTuner has no BatchFetcher; this patch needs updating")
    wanted = {"dataloader_prefetch": True, "dataloader_prefetch_qlen": QUEUE}
    if cuda:
        wanted["dataloader_prefetch_device_threshold_mb"] = DEVICE_THRESHOLD_MB
    return {**wanted, **options}


def _fetch_responses(self) -> None:
    """Upstream's loop (simpletuner 4.10.1), with a blocking `put` instead of sleeping 0.5 s while the queue is full."""
    from simpletuner.helpers.data_backend.runtime import batch_fetcher as upstream

    iterator_fn = upstream._resolve_random_iterator()
    plain = iterator_fn is upstream.DEFAULT_RANDOM_ITERATOR
    in_main_thread = threading.current_thread() is threading.main_thread()  # upstream fills the queue once, then returns
    if not in_main_thread:
        _thread.random = getattr(self, "sd3fit_random", None)
    try:
        while self.keep_running:
            if in_main_thread and self.queue.full():
                break
            try:
                if plain:
                    item = iterator_fn(self._next_fetch_step, self.datasets, update_epoch_step=False)
                else:
                    item = iterator_fn(self._next_fetch_step, self.datasets)
            except ValueError:  # no dataset left: as upstream, stop for good
                self._keep_running = False
                break
            except StopIteration:
                break
            except Exception as exc:  # upstream logs and stops the thread
                upstream.logger.debug(f"BatchFetcher encountered exception: {exc}")
                break
            if self.device_prefetcher is not None:
                item = self.device_prefetcher.prefetch(item)
            while True:
                try:
                    self.queue.put(item, timeout=STOP_POLL_S)
                    break
                except queue.Full:
                    if not self.keep_running:
                        return
            self._next_fetch_step += 1
    finally:
        if upstream.DEFAULT_KEEP_RUNNING_PROPERTY is not None:
            type(self).keep_running = upstream.DEFAULT_KEEP_RUNNING_PROPERTY


def _start_fetching(self) -> threading.Thread:
    """Upstream's, giving the thread the run's own generators (made when the first fetcher starts: here, in the
    step's thread, at the same point of every run): Python's for the sampler, torch's for the data loaders."""
    global _fetch_random, _fetch_generator
    if _fetch_random is None:
        _fetch_random = random.Random()
        _fetch_random.setstate(random.getstate())
        _fetch_generator = torch.Generator().manual_seed(torch.initial_seed())
    self.sd3fit_random = _fetch_random
    for loader in (self.datasets or {}).values():
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            loader.generator = _fetch_generator  # its iterators' seed draws leave torch's global generator alone
    thread = threading.Thread(target=self.fetch_responses)
    thread.start()
    return thread


def _next_response(self, step: int):
    """Upstream's, with a blocking `get` instead of spinning on `queue.empty()`."""
    from simpletuner.helpers.data_backend.runtime import batch_fetcher as upstream

    self.step = step
    item = self.queue.get()
    if self.device_prefetcher is not None:
        item = self.device_prefetcher.consume(item)
    upstream._set_epoch_step_for_training_step(step)
    return item


def apply(on: bool) -> None:
    """Blocking waits and a fetching thread with its own random draws in upstream's BatchFetcher (`on`), or
    upstream's own methods back."""
    global _upstream, _fetch_random, _fetch_generator
    import importlib

    from simpletuner.helpers.data_backend.runtime import batch_fetcher as upstream

    sampler = importlib.import_module(SAMPLER)
    _fetch_random = _fetch_generator = None  # a new run draws from the global states as seeded for it
    if not on:
        if _upstream is not None:
            for name, method in _upstream.items():
                setattr(upstream.BatchFetcher, name, method)
            sampler.random = random
            _upstream = None
        return
    compat.require(CHECKED_AGAINST, __name__)
    needed = ("_resolve_random_iterator", "_set_epoch_step_for_training_step", "DEFAULT_RANDOM_ITERATOR",
              "DEFAULT_KEEP_RUNNING_PROPERTY", "logger")
    missing = [f"{MODULE}.{name}" for name in needed if not hasattr(upstream, name)]
    missing += [f"{MODULE}.BatchFetcher.{name}" for name in METHODS
                if not callable(getattr(upstream.BatchFetcher, name, None))]
    if getattr(sampler, "random", None) not in (random, THREAD_RANDOM):  # it no longer draws with the module
        missing.append(f"{SAMPLER}.random")
    if missing:
        raise RuntimeError(f"{__name__}: SimpleTuner lacks {', '.join(missing)}; this patch needs updating")
    if _upstream is None:
        _upstream = {name: upstream.BatchFetcher.__dict__[name] for name in METHODS}
    upstream.BatchFetcher.start_fetching = _start_fetching
    upstream.BatchFetcher.fetch_responses = _fetch_responses
    upstream.BatchFetcher.next_response = _next_response
    sampler.random = THREAD_RANDOM
