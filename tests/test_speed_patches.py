"""sd3fit's speed patches together on the tiny model, and the small ones alone (sd3fit.simpletuner.patches:
trainable_params, tracemalloc_off, prefetch; compiled blocks and the fused optimizer have their own test files), and
the transformer parked in CPU memory while validation decodes (decode_offload)."""

import json
import tracemalloc

import pytest
import torch

from conftest import train_all
from sd3fit.errors import UserError
from sd3fit.runs import Run
from sd3fit.simpletuner import compat
from sd3fit.simpletuner.patches import (decode_offload, lora_forward, prefetch, ramtorch_sync, tracemalloc_off,
                                        trainable_params)

# exact patches: they change how the step runs, not what it computes (the fused optimizer changes the update's
# arithmetic and is compared against seeds in test_fused_optimizer.py)
EXACT = ["compile_blocks=true", "cache_trainable_params=true", "skip_tracemalloc=true", "skip_ramtorch_syncs=true",
         "plain_lora_forward=true", "defer_step_reads=true"]
# reading ahead, the data loaders draw their seeds from a generator of their own instead of the step's: the same
# training, not the same numbers as without it; but the same numbers run after run
AHEAD = ["prefetch_batches=true", "offload_transformer_for_decode=true"]


def losses(run: Run) -> list[float]:
    return [row["train_loss"] for row in run.read_metrics() if "train_loss" in row]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, demo_assets):
    root = tmp_path_factory.mktemp("speed")
    runs = {"stock": [], "patched": EXACT, "other_seed": ["seed=43"], "ahead": AHEAD, "ahead_again": AHEAD,
            "int8": ["base_model_precision=int8-sd3fit", "compile_blocks=true"],
            # LoRA dropout (SimpleTuner's default 0.1) draws in the graph, which a budget's partitioning reorders
            "no_dropout": ["lora_dropout=0"],
            "budget": ["lora_dropout=0", "compile_blocks=true", "gradient_checkpointing=false", "recompute_budget=0.3"]}
    return {name: Run(folder) for name, folder in train_all(root, runs).items()}


def test_the_demo_trains_the_same_with_the_exact_speed_patches(demo_runs):
    patched = json.loads(demo_runs["patched"].result.read_text())["speed"]
    assert patched["patches"] == ["cache_trainable_params", "compile_blocks", "defer_step_reads", "plain_lora_forward",
                                  "skip_ramtorch_syncs", "skip_tracemalloc"]
    assert patched["lora_forward"] == "peft"  # no RamTorch here: nothing wrapped it
    assert patched["compile_blocks"]["compiled_calls"] > 0 and patched["compile_blocks"]["eager_calls"] == 0
    assert patched["tracemalloc"] is False
    stock = json.loads(demo_runs["stock"].result.read_text())["speed"]
    assert stock == {"patches": [], "tracemalloc": True}  # upstream's own behaviour: tracing left on
    base, fast, other = (losses(demo_runs[k]) for k in ("stock", "patched", "other_seed"))
    assert len(base) == len(fast) == len(other) > 0
    # read a step late, every step's row still has the trainer's numbers (step_reads, metrics_log)
    rows = demo_runs["patched"].read_metrics()
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and all("learning_rate" in r for r in rows)
    gap = max(abs(a - b) for a, b in zip(base, fast))
    spread = max(abs(a - b) for a, b in zip(base, other))
    # another seed draws other timesteps and noise: its losses differ by a large fraction; these patches change
    # only the rounding of a few fused operations
    assert gap < 0.05 * spread, (base, fast, other)


def test_the_demo_trains_alike_with_batches_read_ahead(demo_runs):
    speed = json.loads(demo_runs["ahead"].result.read_text())["speed"]
    assert speed["patches"] == ["prefetch_batches"]  # offload_transformer_for_decode is a memory key
    # upstream's BatchFetcher ran, copying to the GPU ahead of the step where there is one
    assert speed["prefetch"] == {"queue": prefetch.QUEUE, "to_device": torch.cuda.is_available()}
    base, ahead, other = (losses(demo_runs[k]) for k in ("stock", "ahead", "other_seed"))
    assert len(base) == len(ahead) == len(other) > 0
    # the same batches; the step's noise comes from a later point of the seed's sequence (measured: 0.06 against another
    # seed's 0.41)
    assert max(abs(a - b) for a, b in zip(base, ahead)) < 0.5 * max(abs(a - b) for a, b in zip(base, other))
    # and a seed's run repeats: the fetching thread draws nothing the step draws from
    assert losses(demo_runs["ahead_again"]) == ahead
    assert list((demo_runs["ahead"].dir / "output" / "validation_images").glob("step_8_*.png"))  # decoded


def test_the_demo_trains_alike_on_an_int8_base_with_compiled_blocks(demo_runs):
    """The int8 base (sd3fit.simpletuner.patches.int8_base): every linear layer in the blocks but the modulation
    projections multiplies in int8, LoRA trains on top, and the loss stays far inside the seed-to-seed spread."""
    result = json.loads(demo_runs["int8"].result.read_text())
    blocks = json.loads(demo_runs["stock"].result.read_text())["transformer"]
    assert result["transformer"]["quantized_modules"] > 0
    assert result["transformer"]["trainable_parameters"] == blocks["trainable_parameters"]  # the same adapters
    assert result["speed"]["compile_blocks"]["compiled_calls"] > 0
    base, int8_curve, other = (losses(demo_runs[k]) for k in ("stock", "int8", "other_seed"))
    assert len(base) == len(int8_curve) > 0
    gap = max(abs(a - b) for a, b in zip(base, int8_curve))
    assert gap < 0.5 * max(abs(a - b) for a, b in zip(base, other)), (base, int8_curve, other)


def test_the_demo_trains_the_same_with_a_recompute_budget_instead_of_checkpointing(demo_runs):
    speed = json.loads(demo_runs["budget"].result.read_text())["speed"]
    assert speed["compile_blocks"]["recompute_budget"] == 0.3 and speed["compile_blocks"]["compiled_calls"] > 0
    checkpointed, budget = losses(demo_runs["no_dropout"]), losses(demo_runs["budget"])
    assert len(checkpointed) == len(budget) > 0
    assert max(abs(a - b) for a, b in zip(checkpointed, budget)) < 1e-4  # only what is kept for backward changes


def test_prefetch_hands_batches_over_as_soon_as_there_is_room(monkeypatch):
    """Upstream's fetching thread sleeps 0.5 s whenever its queue is full, so a step faster than that waits; sd3fit's
    blocking queue hands over the same batches in the same order without waiting."""
    import time

    from simpletuner.helpers.data_backend.runtime import batch_fetcher as upstream

    monkeypatch.setattr(upstream, "random_dataloader_iterator", lambda step, datasets: {"step": step})
    monkeypatch.setattr(upstream, "_set_epoch_step_for_training_step", lambda step: None)

    def consume(count):
        fetcher = upstream.BatchFetcher(step=0, max_size=prefetch.QUEUE)
        thread = fetcher.start_fetching()
        started = time.perf_counter()
        steps = [fetcher.next_response(i)["step"] for i in range(count)]
        elapsed = time.perf_counter() - started
        fetcher.stop_fetching()
        thread.join(5)
        assert not thread.is_alive()
        return steps, elapsed

    prefetch.apply(True)
    try:
        steps, ours = consume(40)
    finally:
        prefetch.apply(False)
    upstream_steps, theirs = consume(3 * prefetch.QUEUE)
    assert steps == list(range(40)) and upstream_steps == list(range(3 * prefetch.QUEUE))
    assert ours < 0.5 < theirs


def test_the_fetching_thread_draws_from_generators_of_its_own(monkeypatch):
    """Upstream's sampler draws with Python's global `random` in the fetching thread while the step's thread saves and
    restores that state around every compile, and each batch's DataLoader iterator draws a seed from torch's global
    generator, the step's: what a step got then depended on timing. With the patch the fetching thread draws from its
    own copy of Python's state taken when the run's first fetcher starts (continued by the next epoch's), and the
    loaders from a generator of their own: the step's thread rewinding Python's state changes nothing, and torch's
    global generator is left to the step. Upstream's thread repeats draws and moves torch's generator."""
    import importlib
    import random

    from simpletuner.helpers.data_backend.runtime import batch_fetcher as upstream

    sampler = importlib.import_module(prefetch.SAMPLER)

    def epoch(step, datasets):  # an epoch of datasets["left"] batches, each drawn as upstream's sampler draws
        if datasets["left"] == 0:
            raise ValueError("no dataset left")  # as upstream's iterator once every dataset is exhausted
        datasets["left"] -= 1
        iter(datasets["images"])  # as upstream's iterator does for every batch
        return sampler.random.random()

    monkeypatch.setattr(upstream, "random_dataloader_iterator", epoch)
    monkeypatch.setattr(upstream, "_set_epoch_step_for_training_step", lambda step: None)

    images = torch.utils.data.DataLoader(range(4))

    def run(epochs: int, batches: int) -> tuple[list[float], bool]:
        """A run's batches, one fetcher per epoch as upstream's trainer makes them, the global states seeded first; and
        whether torch's global generator moved (the step's thread here draws nothing from it)."""
        random.seed(1234)
        torch.manual_seed(1234)
        torch_state = torch.random.get_rng_state()
        saved = random.getstate()  # what a compile in the step's thread keeps and puts back
        got = []
        for _ in range(epochs):
            fetcher = upstream.BatchFetcher(step=0, max_size=1, datasets={"left": batches, "images": images})
            thread = fetcher.start_fetching()
            for step in range(batches):
                got.append(fetcher.next_response(step))
                random.setstate(saved)  # the step's thread rewinds the global state, again and again
            thread.join(5)
            assert not thread.is_alive()
        return got, not torch.equal(torch_state, torch.random.get_rng_state())

    try:
        prefetch.apply(True)  # a run
        ours = run(2, 20)
        prefetch.apply(True)  # another run in the same process
        again = run(2, 20)
    finally:
        prefetch.apply(False)
        images.generator = None
    assert sampler.random is random  # upstream's module back
    seeded = random.Random(1234)
    assert ours == again == ([seeded.random() for _ in range(40)], False)  # the seed's own sequence, through both epochs
    # upstream: the thread draws again from the state the step's thread put back (it waits 0.5 s on a full queue), and
    # moves torch's global generator
    draws, moved = run(1, 4)
    assert len(set(draws)) < 4 and moved


def test_prefetch_sets_upstreams_options_unless_the_preset_does():
    assert prefetch.options({"seed": 1}, False, True) == {"seed": 1}
    on = prefetch.options({"dataloader_prefetch_qlen": 2}, True, False)
    assert on == {"dataloader_prefetch": True, "dataloader_prefetch_qlen": 2}
    assert prefetch.options({}, True, True)["dataloader_prefetch_device_threshold_mb"] > 0


class Parked(torch.nn.Module):
    """A transformer that says it lives on `device` and records where it is sent."""

    def __init__(self, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.device, self.sent = torch.device(device), []

    def parameters(self, recurse=True):
        device = self.device

        class Where:
            pass

        where = Where()
        where.device = device
        yield where

    def to(self, device):
        self.sent.append(str(device))
        self.device = torch.device(device)
        return self


class Vae(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer, self.seen = transformer, []

    def decode(self, latents):
        self.seen.append(str(self.transformer.device))
        return latents * 2


@pytest.mark.parametrize("home", ["cuda:0", "cpu"])
def test_the_transformer_waits_in_cpu_memory_only_while_the_vae_decodes(home):
    transformer = Parked(home)
    vae = Vae(transformer)
    before = decode_offload.moves
    out = decode_offload.decode_alone(vae, transformer)(torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0))
    assert vae.seen == ["cpu"]  # decoded with the transformer out of the GPU
    assert transformer.sent == ([] if home == "cpu" else ["cpu", home]) and str(transformer.device) == home
    assert decode_offload.moves == before + (home != "cpu")


def test_the_transformer_comes_back_when_the_decode_fails():
    transformer = Parked("cuda:0")
    vae = Vae(transformer)
    vae.decode = lambda latents: (_ for _ in ()).throw(torch.OutOfMemoryError("decode"))
    with pytest.raises(torch.OutOfMemoryError):
        decode_offload.decode_alone(vae, transformer)(torch.ones(1))
    assert transformer.sent == ["cpu", "cuda:0"]


class SyncingUpstream:
    """Upstream's seam: it syncs around backward whenever ramtorch is on (and CUDA is there)."""

    def __init__(self, ramtorch, trained):
        self.config_ramtorch, self.asked = ramtorch, 0
        self.model = type("Model", (), {"get_trained_component": lambda _, unwrap_model: trained})()

    def _ramtorch_sync_enabled(self):
        self.asked += 1
        return self.config_ramtorch


class SyncPatched(ramtorch_sync.RamTorchSyncTrainer, SyncingUpstream):
    pass


def ramtorch_layer():
    layer = type("CPUBouncingLinear", (torch.nn.Module,), {})()
    type(layer).__module__ = "simpletuner.helpers.ramtorch.modules.linear"
    return layer


@pytest.mark.parametrize("on", [True, False])
def test_ramtorch_syncs_stay_only_where_a_ramtorch_layer_trains(on):
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    streamed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(ramtorch_layer()))
    for trained, ramtorch, expected in ((plain, True, not on), (streamed, True, True), (plain, False, False)):
        trainer = SyncPatched(ramtorch, trained)
        trainer.sd3fit_skip_ramtorch_syncs = on
        assert [trainer._ramtorch_sync_enabled() for _ in range(3)] == [expected] * 3
    assert ramtorch_sync.holds_ramtorch(streamed) and not ramtorch_sync.holds_ramtorch(plain)


class Upstream:
    """The two seams of SimpleTuner's Trainer that trainable_params relies on."""

    def __init__(self, found):
        self.found, self.walks = found, 0

    def _get_trainable_parameters(self):
        self.walks += 1
        return self.found() if callable(self.found) else list(self.found)

    def train(self):
        return [self._get_trainable_parameters() for _ in range(3)]


class Patched(trainable_params.TrainableListTrainer, Upstream):
    pass


@pytest.mark.parametrize("on", [True, False])
def test_trainable_parameters_are_listed_once_per_training_run(on):
    trainer = Patched(["a", "b"])
    trainer.sd3fit_cache_trainable_params = on
    lists = trainer.train()
    assert lists == [["a", "b"]] * 3
    assert trainer.walks == (1 if on else 3)
    assert (lists[0] is lists[2]) == on
    trainer.train()  # a second run lists them again
    assert trainer.walks == (2 if on else 6)
    trainer._get_trainable_parameters()  # outside training: upstream's walk
    assert trainer.walks == (3 if on else 7)


def test_a_generator_of_parameters_is_left_as_upstream_gives_it():
    trainer = Patched(lambda: (p for p in "ab"))  # LyCORIS: the wrapped network's parameters()
    trainer.sd3fit_cache_trainable_params = True
    lists = trainer.train()
    assert trainer.walks == 3 and [list(g) for g in lists] == [["a", "b"]] * 3


@pytest.fixture
def factory_tracemalloc():
    import simpletuner.helpers.data_backend.factory as factory

    yield factory
    factory.tracemalloc = tracemalloc  # directly: a test may have made the version gate refuse


def test_the_dataset_factory_gets_no_tracing_and_falls_back_to_resident_memory(factory_tracemalloc):
    factory = factory_tracemalloc
    tracemalloc_off.apply(True)
    with pytest.raises(RuntimeError):
        factory.tracemalloc.start()
    # upstream's own fallback for a RuntimeError: the process's resident memory, in MB
    assert factory.FactoryRegistry._get_memory_usage(None) > 10
    tracemalloc_off.apply(True)  # twice: still the stand-in
    assert not factory.tracemalloc.is_tracing()
    tracemalloc_off.apply(False)
    assert factory.tracemalloc is tracemalloc


def test_small_speed_patches_refuse_what_they_were_not_written_for(monkeypatch, factory_tracemalloc):
    monkeypatch.setattr(factory_tracemalloc, "tracemalloc", object())
    with pytest.raises(RuntimeError, match="needs updating"):
        tracemalloc_off.apply(True)
    with pytest.raises(RuntimeError, match="_get_trainable_parameters"):
        trainable_params.check(object)
    with pytest.raises(RuntimeError, match="_ramtorch_sync_enabled"):
        ramtorch_sync.check(object)
    monkeypatch.setattr(compat, "installed_version", lambda: "9.9.9")
    for apply in (lambda: tracemalloc_off.apply(True), lambda: trainable_params.check(Upstream),
                  lambda: prefetch.options({}, True, False), lambda: prefetch.apply(True),
                  lambda: decode_offload.apply(True),
                  lambda: ramtorch_sync.check(SyncingUpstream), lambda: lora_forward.check(Upstream)):
        with pytest.raises(UserError, match="9.9.9"):
            apply()
