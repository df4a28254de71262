"""One schema for every preset: which keys exist, what type each takes, and which combinations cannot work.

A preset is a flat JSON object of SimpleTuner option names (without the leading `--`) plus the few keys sd3fit
adds itself (`SD3FIT_KEYS`). SimpleTuner's options, their types and choices come from the table dumped from the
pinned SimpleTuner (`simpletuner/options-<version>.json`), so validation needs no SimpleTuner import and takes
milliseconds. Every error names the key.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sd3fit.errors import UserError
from sd3fit.host import size_gib
from sd3fit.measure import settings as measure_settings

SIMPLETUNER_VERSION = "4.10.1"  # the release the option table and every patch were checked against
_OPTIONS_FILE = Path(__file__).parent / "simpletuner" / f"options-{SIMPLETUNER_VERSION}.json"


@dataclass(frozen=True)
class Key:
    type: str  # "str", "int", "float" or "bool"
    help: str


# Keys sd3fit reads itself; they are never passed to SimpleTuner.
SD3FIT_KEYS: dict[str, Key] = {
    "description": Key("str", "One line on what the preset is for; `sd3fit presets` lists it."),
    "dataset_dir": Key(
        "str",
        "Folder of training images with a .txt caption beside each; fills {dataset_dir} in the dataset "
        "definition. Relative paths start at the current directory.",
    ),
    "card": Key(
        "str",
        "The GPU memory the preset is made for, as cards are sold (e.g. 12GB); `sd3fit train lora|full --gpu SIZE` "
        "chooses among presets that name one, by their measured whole-run peaks.",
    ),
    "gpu_memory_limit_gib": Key(
        "float",
        "Hold the whole run within this many GiB of GPU memory (e.g. 6.0): PyTorch's caching allocator is capped at it "
        "less what the process holds outside the allocator (CUDA context, libraries), so it gives its cached blocks "
        "back instead of reserving more; memory in use beyond it is an out-of-memory error. Leaves room for other "
        "processes (a desktop) on the card. CUDA only; under sd3fit bench --gpu-budget the smaller of the two holds.",
    ),
    "offload_optimizer_state": Key(
        "bool",
        "Move the optimizer's state to CPU memory while validation images are generated and checkpoints are written, "
        "and back before the next step: a full fine-tune's validation then fits the memory its training needs.",
    ),
    "stream_optimizer_state": Key(
        "bool",
        "With optimizer_release_gradients, keep the optimizer's state in CPU memory for good and copy each block's "
        "state to the GPU for that block's step only (about 0.2 GiB there instead of the whole state, 3.8 GiB for SD3 "
        "Medium in 8 bits); every step copies the whole state to the GPU and back.",
    ),
    "ramtorch_copy_ahead_gib": Key(
        "float",
        "With ramtorch_text_encoder, the GiB of weights RamTorch may copy to the GPU before the host waits for it while "
        "text embeddings are cached (e.g. 0.5): without a bound the copies' freed memory is reserved anew until the "
        "card is full, although about 1.2 GiB is in use.",
    ),
    "offload_transformer_for_decode": Key(
        "bool",
        "While a validation image is decoded by the VAE, keep the transformer in CPU memory (back right after): the "
        "decode reuses the memory of its weights. Costs two copies of the weights per validation image.",
    ),
    "recompute_budget": Key(
        "float",
        "With compile_blocks and gradient_checkpointing=false: each compiled block keeps for the backward pass at most "
        "this fraction (0-1) of the activations it would keep and recomputes the rest there, the cheapest operations "
        "first (torch.compile's activation memory budget); a finer trade than checkpointing whole blocks.",
    ),
    "vae_tile_size": Key(
        "int",
        "With vae_enable_tiling, the VAE's tile in pixels (e.g. 512); diffusers tiles SD3's VAE only above 1024 px, so "
        "at 1024 px tiling saves nothing without it.",
    ),
    **{name: Key(kind, text) for name, (kind, text) in measure_settings.KEYS.items()},
}

# sd3fit's speed patches, one key each (bool, off when absent): `false` for all of them is stock SimpleTuner's step.
SPEED_KEYS: dict[str, Key] = {
    "compile_blocks": Key(
        "bool",
        "Compile each MMDiT block with torch.compile (also when it is checkpointed): fewer, fused kernels and little "
        "host work per block; the first steps take longer while it compiles.",
    ),
    "cuda_graph_blocks": Key(
        "bool",
        "With compile_blocks, replay each block's compiled training graphs as CUDA graphs (torch.compile's "
        "reduce-overhead mode): a step launches one graph per block each way instead of every kernel from Python, "
        "for steps that leave the GPU waiting on the host. CUDA only (ignored on a CPU); needs set_grads_to_none=true.",
    ),
    "fused_optimizer": Key(
        "bool",
        "Step all parameters at once with multi-tensor kernels (torch-optimi's foreach AdamW with Kahan summation for "
        "adamw_bf16) instead of one parameter at a time.",
    ),
    "cache_trainable_params": Key(
        "bool",
        "List the trainable parameters once when training starts instead of walking the whole model for them twice "
        "every step (tens of milliseconds of host time per step at SD3 Medium's size).",
    ),
    "skip_tracemalloc": Key(
        "bool",
        "Keep Python's allocation tracing off: SimpleTuner starts tracemalloc when it configures the datasets and "
        "leaves it on for the whole run, which slows every Python allocation of every step.",
    ),
    "prefetch_batches": Key(
        "bool",
        "Read each step's cached latents and text embeddings in a background thread ahead of the step and copy them "
        "to the GPU there (SimpleTuner's dataloader_prefetch, off by default): the loop no longer waits on the disk.",
    ),
    "skip_ramtorch_syncs": Key(
        "bool",
        "With ramtorch on for the text encoders only, skip the two whole-GPU synchronisations SimpleTuner makes around "
        "every backward pass for RamTorch's layers (kept when the trained model has any).",
    ),
    "plain_lora_forward": Key(
        "bool",
        "With ramtorch on for the text encoders only, run peft's own LoRA forward in training: SimpleTuner wraps it for "
        "the whole process to move each layer's weights to the input's device first, which costs host time on every "
        "LoRA layer and breaks compiled blocks apart (kept when the trained model has a RamTorch or offloaded layer).",
    ),
    "defer_step_reads": Key(
        "bool",
        "Read the step's loss and statistics on the host a step late (copied to host memory behind the step), instead "
        "of SimpleTuner's reads inside every step, each of which makes the host wait for the GPU to finish all it was "
        "given; a non-finite loss still stops the run, at most two steps later and before any validation or checkpoint.",
    ),
    "release_by_block": Key(
        "bool",
        "With optimizer_release_gradients, step the parameters of each transformer block together once all their "
        "gradients are in (torchao's low-bit AdamW: one compiled call per block instead of one per parameter); holds "
        "the gradients of one block at most.",
    ),
}
SD3FIT_KEYS.update(SPEED_KEYS)


def speed_patches(values: dict[str, Any]) -> list[str]:
    """The speed keys a preset's (or a run's) values turn on, sorted."""
    return sorted(key for key in SPEED_KEYS if values.get(key))

# base_model_precision values sd3fit adds (sd3fit.simpletuner.patches.int8_base), with the compute capability each
# needs on a GPU and what for
SD3FIT_PRECISIONS: dict[str, tuple[tuple[int, int], str]] = {
    "int8-sd3fit": ((8, 0), "int8 tensor cores"),
}

# optimizer prefixes SimpleTuner's FSDP2 path replaces by another optimizer
# (simpletuner.helpers.training.optimizer_param.FSDP2_INCOMPATIBLE_PREFIXES)
FSDP2_UNSHARDABLE = ("optimi-", "bnb-")

# SimpleTuner options that sd3fit sets for every run, with the reason a preset may not.
OWNED_KEYS: dict[str, str] = {
    "output_dir": "each run writes to runs/<name>/output; choose the name with --name",
}
# SimpleTuner options that delete files from the user's dataset folder; training never destroys its inputs.
DESTRUCTIVE_KEYS = ("delete_unwanted_images", "delete_problematic_images", "delete_nsfw_images")


@lru_cache(maxsize=1)
def simpletuner_options() -> dict[str, dict]:
    """SimpleTuner's options by every name they answer to (aliases included)."""
    table = json.loads(_OPTIONS_FILE.read_text())["options"]
    by_name = {}
    for dest, spec in table.items():
        for name in spec["names"]:
            by_name[name] = {**spec, "dest": dest}
    return by_name


def known_keys() -> set[str]:
    return set(simpletuner_options()) | set(SD3FIT_KEYS)


def _check_type(key: str, value: Any, kind: str, choices: list | None) -> Any:
    """Return the value in the type SimpleTuner expects, or raise naming the key."""
    if value is None:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"option {key} must be true or false, not {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"option {key} must be a whole number, not {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"option {key} must be a number, not {value!r}")
        value = float(value)
    elif kind == "str":
        # SimpleTuner parses some text options as JSON (target modules, skip layers): lists and objects pass through
        if isinstance(value, bool):
            raise UserError(f"option {key} takes text, not {value!r}")
        if isinstance(value, (int, float)):
            value = str(value)
    if choices is not None and not isinstance(value, (list, dict)) and str(value) not in [str(c) for c in choices]:
        shown = ", ".join(str(c) for c in choices)
        raise UserError(f"option {key} must be one of {shown}; got {value!r}")
    return value


def _unknown(key: str) -> UserError:
    close = difflib.get_close_matches(key, sorted(known_keys()), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else " (see `sd3fit options` for the full list)"
    return UserError(f"unknown option {key}{hint}")


def _rules(cfg: dict[str, Any]) -> None:
    """Combinations SimpleTuner would reject late, or accept and then do something else than asked."""
    get = cfg.get
    if get("model_family") != "sd3":
        raise UserError(f"option model_family must be sd3 (sd3fit fine-tunes Stable Diffusion 3), not {get('model_family')!r}")
    if not get("pretrained_model_name_or_path"):
        raise UserError("option pretrained_model_name_or_path is missing: give a Hub id or a local diffusers folder")
    if not get("data_backend_config"):
        raise UserError("option data_backend_config is missing: name a dataset definition such as datasets/image-folder.json")
    model_type = get("model_type", "full")
    precision = get("base_model_precision", "no_change")
    if model_type == "full" and precision not in (None, "no_change"):
        raise UserError(
            f"option base_model_precision={precision} needs model_type=lora: "
            "a quantized base model cannot be fully fine-tuned; use base_model_precision=no_change"
        )
    if precision == "fp8-quanto":
        raise UserError("option base_model_precision=fp8-quanto is not supported for SD3 by SimpleTuner; use int8-quanto")
    steps, epochs = get("max_train_steps") or 0, get("num_train_epochs")
    if steps > 0 and epochs not in (None, 0):
        raise UserError("option num_train_epochs must be 0 when max_train_steps is set (one training length, not two)")
    if steps <= 0 and not epochs:
        raise UserError("option max_train_steps is missing: set it (with num_train_epochs 0) or num_train_epochs")
    for key in ("lora_rank", "train_batch_size", "resolution"):
        if get(key) is not None and get(key) <= 0:
            raise UserError(f"option {key} must be positive, not {get(key)}")
    if get("learning_rate") is not None and get("learning_rate") <= 0:
        raise UserError(f"option learning_rate must be positive, not {get('learning_rate')}")
    if get("push_to_hub") and not get("hub_model_id"):
        raise UserError("option push_to_hub needs hub_model_id (the Hub repository to upload to)")
    if get("lora_type") == "lycoris" and not get("lycoris_config"):
        raise UserError("option lora_type=lycoris needs lycoris_config (a LyCORIS JSON file)")
    for key in DESTRUCTIVE_KEYS:
        if get(key):
            raise UserError(f"option {key} would delete files from your dataset folder; sd3fit refuses it, remove such images yourself")
    if get("gradient_checkpointing_interval") and get("gradient_checkpointing") is False:
        raise UserError("option gradient_checkpointing_interval needs gradient_checkpointing=true")
    if get("optimizer_release_gradients") and get("grad_clip_method") == "norm" and (get("max_grad_norm") or 0) > 0:
        raise UserError("option optimizer_release_gradients frees each gradient as soon as it is used, so clipping by "
                        "norm (which needs all of them) cannot work; use grad_clip_method=value or max_grad_norm=0")
    if get("stream_optimizer_state") and not get("optimizer_release_gradients"):
        raise UserError("option stream_optimizer_state brings each block's state to the GPU as its gradients are "
                        "released; set optimizer_release_gradients=true")
    ahead = get("ramtorch_copy_ahead_gib")
    if ahead is not None:
        if not (get("ramtorch") and get("ramtorch_text_encoder")):
            raise UserError("option ramtorch_copy_ahead_gib bounds RamTorch's text-encoder copies; set ramtorch=true and "
                            "ramtorch_text_encoder=true, or remove it")
        if ahead <= 0:
            raise UserError(f"option ramtorch_copy_ahead_gib must be positive (e.g. 0.5), not {ahead}")
    optimizer = str(get("optimizer") or "").lower()
    if get("fsdp_enable") and int(get("fsdp_version") or 2) == 2 and (optimizer.startswith(FSDP2_UNSHARDABLE)
                                                                       or optimizer == "soap"):
        raise UserError(f"option optimizer={optimizer} cannot step FSDP2's sharded parameters (SimpleTuner 4.10.1 "
                        "would silently train with adamw_schedulefree instead); choose an optimizer without the "
                        "optimi- or bnb- prefix (e.g. adamw_bf16) or set fsdp_enable=false")
    if get("optimizer_release_gradients") and get("fsdp_enable"):
        raise UserError("option optimizer_release_gradients steps whole parameters in the backward pass and cannot step "
                        "FSDP's shards; turn one of optimizer_release_gradients and fsdp_enable off")
    if get("card") is not None:
        size_gib(get("card"), "option card")
    limit = get("gpu_memory_limit_gib")
    if limit is not None and limit <= 0:
        raise UserError(f"option gpu_memory_limit_gib is the GPU memory the run may hold, in GiB above 0 (e.g. 6.0), "
                        f"not {limit}")
    tile = get("vae_tile_size")
    if tile is not None and (tile < 64 or tile % 64):
        raise UserError(f"option vae_tile_size is the VAE's tile in pixels, a multiple of 64 from 64 up (e.g. 512), "
                        f"not {tile}")
    if get("compile_blocks"):
        _compile_rules(get)
    if get("cuda_graph_blocks"):
        if not get("compile_blocks"):
            raise UserError("option cuda_graph_blocks replays compiled blocks; set compile_blocks=true or "
                            "cuda_graph_blocks=false")
        if not get("set_grads_to_none"):
            raise UserError("option cuda_graph_blocks needs set_grads_to_none=true: a CUDA graph's next replay "
                            "overwrites the gradients it returned, so they cannot be kept and zeroed between steps")
        # one run with both of these and cuda_graph_blocks (the tiny model on an H200) stopped at its first graph
        # replay; which of the two the graphs cannot take is not known yet
        if get("gradient_checkpointing"):
            raise UserError("option cuda_graph_blocks is not verified with gradient_checkpointing (a run with both "
                            "stopped at its first graph replay); use recompute_budget instead of checkpointing")
        if get("defer_step_reads"):
            raise UserError("options defer_step_reads and cuda_graph_blocks are not verified together (a run with both "
                            "stopped at its first graph replay); set one of them to false")
    budget = get("recompute_budget")
    if budget is not None:
        if not 0 < budget < 1:
            raise UserError(f"option recompute_budget is the fraction of activations a block keeps, between 0 and 1 "
                            f"(both excluded), not {budget}")
        if not get("compile_blocks"):
            raise UserError("option recompute_budget needs compile_blocks=true: the compiler chooses what to recompute")
        if get("gradient_checkpointing"):
            raise UserError("option recompute_budget replaces checkpointing whole blocks; set gradient_checkpointing=false")
    measure_settings.check({k: v for k, v in cfg.items() if k in measure_settings.KEYS})


def _compile_rules(get) -> None:
    """Compiled blocks take their weights as graph inputs: weights that move between devices every step, or that are
    quantized tensor types, would recompile or break the graphs."""
    if get("base_model_precision", "no_change") not in ("no_change", *SD3FIT_PRECISIONS):
        raise UserError(f"option compile_blocks needs a bf16 base (base_model_precision=no_change) or sd3fit's own "
                        f"({', '.join(SD3FIT_PRECISIONS)}), not {get('base_model_precision')}; set "
                        "compile_blocks=false with a quantized base")
    if (get("musubi_blocks_to_swap") or 0) > 0:
        raise UserError("option compile_blocks cannot compile blocks that musubi_blocks_to_swap moves between CPU and "
                        "GPU every step; set one of compile_blocks=false and musubi_blocks_to_swap=0")
    if get("ramtorch") and get("ramtorch_transformer_percent") != 0:
        raise UserError("option compile_blocks cannot compile blocks whose weights RamTorch streams from CPU memory; "
                        "set ramtorch_transformer_percent=0 (text encoders only) or compile_blocks=false")


def validate(preset: dict[str, Any]) -> dict[str, Any]:
    """Check a preset (after overrides) and return it with values in the types SimpleTuner expects."""
    if not isinstance(preset, dict):
        raise UserError("a preset must be a JSON object of option names and values")
    options = simpletuner_options()
    out: dict[str, Any] = {}
    for key, value in preset.items():
        if key in OWNED_KEYS:
            raise UserError(f"option {key} is set by sd3fit: {OWNED_KEYS[key]}")
        if key in SD3FIT_KEYS:
            out[key] = _check_type(key, value, SD3FIT_KEYS[key].type, None)
        elif key in options:
            spec = options[key]
            choices = spec["choices"]
            if key == "base_model_precision":
                choices = [*choices, *SD3FIT_PRECISIONS]
            out[key] = _check_type(key, value, spec["type"], choices)
        else:
            raise _unknown(key)
    _rules(out)
    return out


def split(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate sd3fit's own keys from the options passed to SimpleTuner."""
    own = {k: v for k, v in cfg.items() if k in SD3FIT_KEYS}
    simpletuner = {k: v for k, v in cfg.items() if k not in SD3FIT_KEYS}
    return own, simpletuner
