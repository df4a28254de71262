"""Which presets fit a GPU, and which of them is fastest: decided before anything is loaded, from the committed
benchmark of SD3 Medium's architecture (`REFERENCES`).

A configuration is judged only when every option that can change memory equals that of a benchmarked run (the
model must be SD3 Medium, from the Hub or a local folder), so an edited preset is never judged by another
configuration's numbers. Options known not to change memory (`IGNORED`: paths, lengths, learning rates, seeds,
logging, validation prompts) are the only ones left out; any other difference, a memory-saving option included,
makes it another configuration.

A card fits a run when the run's whole-run device peak (PyTorch's reserved peak plus the memory the process held
outside the allocator, both measured) is below the card's memory. A run on N processes (`--num-processes N`, one
card each) is judged only by benchmark rows of N processes, by the largest peak of any one of them: N cards of a
size fit when that peak is below the size. Rows from before the device peak was measured
give only the allocated peak; for them the rule is weaker: refuse only a card below that peak, which no card can
serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sd3fit import host, presets, schema, sd3_medium
from sd3fit.bench import results
from sd3fit.errors import UserError
from sd3fit.presets import PROJECT_DIR, portable
from sd3fit.runs import Run, shared_gpu

RESULTS_DIR = PROJECT_DIR / "results"
# The first matching row is the one used, and step times rank presets against each other, so newer leases come first:
# 2026-11-29-small-graphs-h200 (the 8, 12 and 16 GB presets with CUDA graphs, as committed, lora-12gb beside
# lora-24gb and full-16gb beside full-24gb in one call each, full-12gb and lora-8gb each alone later in that lease),
# then 2026-11-29-graphs-h200 (lora-24gb and full-24gb with CUDA graphs; the ungraphed lora-8gb held within 5.95 GiB),
# then 2026-11-29-fit-h200 (the speed-patched presets of that day;
# lora-8gb's row under a 6 GiB budget before its 8 GB one, which reserved free cache up to that larger cap), the
# lora-12gb, lora-8gb-without-checkpointing and lora-6gb rows, each measured beside lora-24gb in one call, and the
# full presets. Then the card presets' first benchmark and the later ones for configurations it does not have (their
# machine stepped about 1.4x slower, so their step times only make them lose a close choice, never win one); the
# full-8gb lease's machine stepped full-24gb 1.7x slower.
FIT_H200 = RESULTS_DIR / "2026-11-29-fit-h200"
GRAPHS_H200 = RESULTS_DIR / "2026-11-29-graphs-h200"
SMALL_GRAPHS_H200 = RESULTS_DIR / "2026-11-29-small-graphs-h200"
REFERENCES = (
    SMALL_GRAPHS_H200 / "bench-lora" / "results.jsonl",  # lora-24gb and lora-12gb, one call
    SMALL_GRAPHS_H200 / "bench-full-12gb" / "results.jsonl",  # full-12gb
    SMALL_GRAPHS_H200 / "bench-full" / "results.jsonl",  # full-24gb and full-16gb, one call
    SMALL_GRAPHS_H200 / "bench-lora-8gb" / "results.jsonl",  # lora-8gb
    GRAPHS_H200 / "bench-lora" / "results.jsonl",  # lora-24gb (CUDA graphs) with the one without, one call
    GRAPHS_H200 / "bench-full" / "results.jsonl",  # full-24gb (CUDA graphs) with the one without, one call
    GRAPHS_H200 / "bench-lora-8gb-limit" / "results.jsonl",  # lora-8gb, held within 5.95 GiB
    FIT_H200 / "bench-lora-8gb-6GiB" / "results.jsonl",
    FIT_H200 / "bench-lora" / "results.jsonl",
    RESULTS_DIR / "2026-11-29-lora-h200" / "bench-lora-12gb" / "results.jsonl",  # lora-12gb with lora-24gb, one call
    RESULTS_DIR / "2026-11-29-copy-ahead-h200" / "bench-lora-8gb-recompute" / "results.jsonl",  # lora-8gb, lora-24gb
    RESULTS_DIR / "2026-11-29-copy-ahead-h200" / "bench-lora-6gb" / "results.jsonl",  # lora-6gb with lora-24gb
    FIT_H200 / "bench-full-again" / "results.jsonl",  # full-24gb and full-12gb, one call
    FIT_H200 / "bench-full" / "results.jsonl",  # full-16gb
    RESULTS_DIR / "2026-11-29-fit8-h200" / "bench-full" / "results.jsonl",  # full-8gb
    RESULTS_DIR / "2026-11-28-cards-h200" / "cards" / "results.jsonl",
    RESULTS_DIR / "2026-11-28-cards2-h200" / "cards" / "results.jsonl",
    RESULTS_DIR / "2026-11-28-cards2-h200" / "tiles" / "results.jsonl",
    RESULTS_DIR / "2026-11-28-bench-h200" / "all-presets" / "results-rescanned.jsonl",
    RESULTS_DIR / "2026-11-28-speed2-h200" / "bench" / "results.jsonl",
)
# step times within this factor of the fastest count as the same speed: one configuration's eight-step median ranged
# 0.189-0.250 s over three runs in one lease (full-24gb and its copy with optimizer-state offload, 2026-11-29-fit-h200)
SAME_SPEED = 1.3
KINDS = ("lora", "full")  # model types `sd3fit train KIND --gpu SIZE` chooses a preset for
# SimpleTuner options that never change GPU memory; every other option does
IGNORED = frozenset({
    "pretrained_model_name_or_path", "data_backend_config", "output_dir", "max_train_steps", "num_train_epochs",
    "learning_rate", "lr_scheduler", "lr_warmup_steps", "seed", "checkpointing_steps", "checkpoints_total_limit",
    "report_to", "tracker_project_name", "tracker_run_name", "push_to_hub", "hub_model_id", "validation_steps",
    "validation_prompt", "validation_seed", "validation_guidance", "validation_num_inference_steps",
    "caption_dropout_probability", "lora_alpha", "disable_benchmark", "resume_from_checkpoint", "minimum_image_size",
})
# sd3fit's own keys that change memory (cuda_graph_blocks: the graphs' memory pool); its others (description, card,
# measuring, the other speed keys such as fused_optimizer, whose state takes the memory of the optimizer it
# replaces) are left out like IGNORED
OWN_MEMORY_KEYS = frozenset({"offload_optimizer_state", "offload_transformer_for_decode", "recompute_budget",
                             "vae_tile_size", "stream_optimizer_state", "ramtorch_copy_ahead_gib",
                             "gpu_memory_limit_gib", "cuda_graph_blocks"})
# options that hold weights in CPU RAM: such a run also needs the host memory it was measured with
OFFLOAD_KEYS = ("offload_during_startup", "ramtorch", "ramtorch_text_encoder", "musubi_blocks_to_swap",
                "stream_optimizer_state")


@dataclass(frozen=True)
class Measured:
    run: str  # the run folder it was measured in, as records show paths
    allocated_gib: float  # whole-run peak allocated
    device_gib: float | None  # whole-run reserved peak + memory outside the allocator; None in older rows
    step_s: float | None  # median step
    rss_gib: float | None  # the process's peak resident memory
    reference: str  # the results file

    @property
    def need_gib(self) -> float:
        return self.device_gib if self.device_gib is not None else self.allocated_gib

    def fits(self, total_gib: float) -> bool:
        return self.device_gib < total_gib if self.device_gib is not None else self.allocated_gib <= total_gib


def memory_options(options: dict) -> dict:
    """The options that make a configuration, from a preset's values (SimpleTuner's options and sd3fit's keys)."""
    own = set(schema.SD3FIT_KEYS) - OWN_MEMORY_KEYS
    unset = lambda key, value: value is None or (value is False and key in OWN_MEMORY_KEYS)  # noqa: E731  own bools: off
    return {key: value for key, value in options.items() if key not in IGNORED and key not in own
            and not unset(key, value)}


def _run_options(run: Run) -> dict:
    config = run.read_config()
    return {**config["simpletuner"], **{k: v for k, v in config.get("sd3fit", {}).items() if k in OWN_MEMORY_KEYS}}


def measured(options: dict, references=None, processes: int = 1) -> Measured | None:
    """The benchmarked run with the same memory options on as many processes, or None (not SD3 Medium, or never
    benchmarked so). For several processes its device peak is the largest of any one process's."""
    if not sd3_medium.is_sd3_medium(str(options.get("pretrained_model_name_or_path", ""))):
        return None
    wanted = memory_options(options)
    for reference in map(Path, REFERENCES if references is None else references):
        for row in results.read(reference) if reference.is_file() else []:
            if row.get("status") != "finished" or row.get("run_peak_allocated_gib") is None:
                continue
            if (row.get("processes") or 1) != processes:  # rows from before `--num-processes` ran one process
                continue
            if shared_gpu(row):
                continue  # its device peak is not this configuration's
            run = Run(reference.parent / "runs" / Path(row["run"]).name)
            if not run.config.is_file() or memory_options(_run_options(run)) != wanted:
                continue
            device = row.get("largest_rank_device_gib") if processes > 1 else row.get("run_peak_device_gib")
            return Measured(run=portable(run.dir), allocated_gib=row["run_peak_allocated_gib"],
                            device_gib=device, step_s=row.get("step_s_median"),
                            rss_gib=row.get("run_peak_rss_gib"), reference=portable(reference))
    return None


def check_capability(options: dict, capability: tuple[int, int] | None, name: str = "this GPU") -> None:
    """Refuse, before anything loads, a base precision the GPU cannot run (None: no GPU; the CPU reference path)."""
    precision = options.get("base_model_precision")
    if capability is None or precision not in schema.SD3FIT_PRECISIONS:
        return
    needed, what = schema.SD3FIT_PRECISIONS[precision]
    if tuple(capability) < needed:
        raise UserError(
            f"base_model_precision={precision} needs {what} (compute capability {needed[0]}.{needed[1]} or later), "
            f"and {name} has {capability[0]}.{capability[1]}; use base_model_precision=int8-quanto (the same memory, "
            "slower) or no_change"
        )


def card(text: str) -> tuple[str, float]:
    """`--gpu 12GB` as (name, GiB)."""
    return f"a {text.strip()} card", host.size_gib(text, "--gpu")


def check(preset_name: str, options: dict, device: tuple[str, float] | None, ram_gib: float | None = None,
          processes: int = 1) -> None:
    """Refuse a GPU (name, GiB; one per process) smaller than the configuration's measured need, and a machine whose
    free RAM is below what an offloading configuration held in CPU memory when measured."""
    found = measured(options, processes=processes)
    if found is None:
        return
    if device is not None and not found.fits(device[1]):
        name, total = device
        what = ("whole-run device peak" if found.device_gib is not None else "peak allocated") + \
            f" in a benchmark run of the same configuration, {found.run}"
        raise UserError(
            f"preset {preset_name} needs {'more than ' if found.device_gib is not None else 'at least '}"
            f"{found.need_gib:.2f} GiB of GPU memory{_each(processes)} ({what}), but {name} has {total:.2f} GiB; choose "
            "a preset that fits (sd3fit train lora|full --gpu SIZE picks one) or pass --skip-fit-check to try anyway"
        )
    # every process keeps its own copy of what it offloads
    ram_need = found.rss_gib * processes if found.rss_gib else None
    if ram_gib is not None and ram_need and any(options.get(k) for k in OFFLOAD_KEYS) and ram_gib < ram_need:
        raise UserError(
            f"preset {preset_name} keeps weights in CPU memory and needs about {ram_need:.1f} GiB of RAM (peak "
            f"measured in {found.run}{', for each process' if processes > 1 else ''}), but this machine has "
            f"{ram_gib:.1f} GiB available; free memory, choose a preset for a larger card, or pass --skip-fit-check "
            "to try anyway"
        )


def candidates(kind: str) -> list[str]:
    """Presets in config/ made for a card (`card` key) that train `kind` (lora or full)."""
    found = []
    for name in presets.available():
        data = presets.read(presets.CONFIG_DIR / f"{name}.json")
        if data.get("card") and data.get("model_type") == kind:
            found.append(name)
    return found


def _each(processes: int) -> str:
    return f" on each of {processes} processes" if processes > 1 else ""


def cards(name: str, processes: int) -> str:
    """How a card (`name`, e.g. "a 12GB card") reads when each of `processes` processes has one."""
    return f"{processes} x {name}" if processes > 1 else name


def _measured_candidates(kind: str, overrides: list[str], processes: int = 1) -> list[tuple[str, Measured]]:
    """The card presets of `kind` (with `overrides`) that have a benchmark row on `processes` processes, with that
    row's numbers."""
    scored = []
    for name in candidates(kind):
        found = measured(presets.load(name, overrides).values, processes=processes)
        if found is not None:
            scored.append((name, found))
    return scored


def pick(kind: str, device: tuple[str, float], overrides: list[str], processes: int = 1) -> str:
    """The fastest measured preset of `kind` whose whole-run need is below the GPU's memory (of those within
    `SAME_SPEED` of it, the one made for the largest card up to this GPU, this card's own before a larger card's that
    fits as well); with several processes, one such GPU
    each, judged by benchmark rows of as many processes."""
    scored = _measured_candidates(kind, overrides, processes)
    if not scored and processes > 1:
        raise UserError(f"no {kind} preset has a benchmark run on {processes} processes to judge {processes} cards by "
                        f"(sd3fit bench --num-processes {processes} measures one); name a preset instead")
    if not scored:
        raise UserError(f"no {kind} preset has a benchmark run of its configuration with these options (SD3 Medium "
                        "only; an override that changes memory makes another configuration); name a preset instead")
    name, total = device
    fitting = [(found.step_s or float("inf"), preset) for preset, found in scored if found.fits(total)]
    if not fitting:
        smallest_preset, smallest = min(scored, key=lambda item: item[1].need_gib)
        card_size = _card(smallest_preset)
        raise UserError(f"no {kind} preset fits {cards(name, processes)} ({total:.2f} GiB); the smallest card that "
                        f"works is {card_size} ({smallest_preset} needs {smallest.need_gib:.2f} GiB{_each(processes)})")
    fastest = min(fitting)
    # of the presets as fast as the fastest, the one made for the largest card, counting a larger card's preset that
    # fits as made for this one (a 24 GB preset on a 24 GB card, not a 16 GB one that saves memory it does not need;
    # on a 16 GB card the 24 GB LoRA preset that fits, not the 12 GB one); between this card's own preset and a
    # larger card's that fits as well, this card's own (on an 8 GB card lora-8gb, not lora-12gb with its int8 text
    # encoders); the faster of equals
    made_for = []
    for step, preset in fitting:
        if step <= fastest[0] * SAME_SPEED:
            size = host.size_gib(_card(preset), "card")
            made_for.append((min(size, total), size <= total, -step, preset))
    return max(made_for)[3]


def _card(preset: str) -> str:
    return presets.read(presets.CONFIG_DIR / f"{preset}.json")["card"]


def smaller(run: Run) -> tuple[str, float] | None:
    """After a run ran out of memory: the card preset of its kind that needs the most memory below what the run's
    configuration was measured to need (any card preset, when it was never measured), as (name, GiB)."""
    options = _run_options(run)
    own = measured(options)
    found = [(other.need_gib, name) for name, other in _measured_candidates(options.get("model_type", "full"), [])
             if own is None or other.need_gib < own.need_gib]
    if not found:
        return None
    need, name = max(found)
    return name, need
