"""Where an inference column's weights come from, checked before any image is made.

An adapter is a Hub id (`owner/name`, optionally `owner/name:file.safetensors`), a local `.safetensors` file or a
run folder; a full fine-tune is a run folder (its saved pipeline's transformer) or a transformer folder. Each check
fails with one line that names the problem and the fix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sd3fit.errors import UserError
from sd3fit.hub import looks_like_path
from sd3fit.runs import Run

ADAPTER_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Adapter:
    spec: str  # what the user typed
    file: Path
    label: str
    expected_rank: int | None = None  # the training run's lora_rank, when the adapter comes from a run folder
    # lora_alpha / rank as trained, when known: diffusers assumes alpha = rank for a file without that metadata
    # (SimpleTuner 4.10.1 writes none), so the scale is multiplied by it to apply the adapter as it was trained
    alpha_factor: float = 1.0
    alpha_source: str = "none recorded: alpha = rank assumed"


@dataclass(frozen=True)
class FullCheckpoint:
    spec: str
    transformer: Path
    label: str


_HUB_WITH_FILE = re.compile(r"^[\w.-]+/[\w.-]+:[^/]+$")


def _run_config(run_dir: Path) -> dict:
    run = Run(run_dir)
    return run.read_config().get("simpletuner", {}) if run.config.is_file() else {}


def _label(file: Path) -> str:
    """A column name: the file's stem, or the run's name for a file saved as output/pytorch_lora_weights."""
    if file.name != ADAPTER_FILE:
        return file.stem
    return file.parent.parent.name if file.parent.name == "output" else file.parent.name


def _from_metadata(file: Path) -> tuple[float, str] | None:
    """lora_alpha / r from the file's diffusers metadata, if it has any."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "null") or "null")
    except Exception:
        return None
    if isinstance(meta, dict) and meta.get("r") and meta.get("lora_alpha"):
        return meta["lora_alpha"] / meta["r"], f"file metadata: lora_alpha {meta['lora_alpha']}, rank {meta['r']}"
    return None


def adapter(spec: str) -> Adapter:
    path = Path(spec).expanduser()
    if _HUB_WITH_FILE.match(spec) and not path.exists():
        return _hub_adapter(spec)
    if path.is_dir():
        candidates = [path / "output" / ADAPTER_FILE, path / ADAPTER_FILE]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            hint = " (that run is a full fine-tune: use --checkpoint)" if (path / "output" / "pipeline").is_dir() else ""
            raise UserError(f"no LoRA adapter in {spec}: expected output/{ADAPTER_FILE} (a LoRA run folder) or {ADAPTER_FILE}{hint}")
        config = _run_config(path)
        rank = config.get("lora_rank")
        alpha = _from_metadata(found)
        if alpha is None and rank:
            trained_alpha = config.get("lora_alpha") or rank
            alpha = (trained_alpha / rank, f"run config: lora_alpha {trained_alpha}, lora_rank {rank}")
        return Adapter(spec, found, path.name, int(rank) if rank else None, *(alpha or (1.0, Adapter.alpha_source)))
    if spec.endswith(".safetensors") or looks_like_path(spec):
        if not path.is_file():
            raise UserError(f"adapter file not found: {spec}; give a .safetensors file, a run folder or a Hub id")
        return Adapter(spec, path, _label(path), None, *(_from_metadata(path) or (1.0, Adapter.alpha_source)))
    return _hub_adapter(spec)


def _hub_adapter(spec: str) -> Adapter:
    from huggingface_hub import get_token, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, filename = spec.partition(":")
    filename = filename or ADAPTER_FILE
    local_hint = f"; no file or folder {spec} exists here either" if Path(repo_id.split("/")[0]).exists() else ""
    try:
        file = hf_hub_download(repo_id, filename)
    except LocalEntryNotFoundError:  # offline or no network (a subclass of EntryNotFoundError: test it first)
        raise UserError(f"cannot download adapter {spec}: the Hub is unreachable or HF_HUB_OFFLINE is set, and it is not cached{local_hint}") from None
    except GatedRepoError:
        raise UserError(f"adapter {repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        hint = "" if get_token() else ", or log in with `hf auth login` if it is private"
        raise UserError(f"adapter {repo_id} was not found on the Hugging Face Hub: check the id{hint}{local_hint}") from None
    except EntryNotFoundError:
        raise UserError(f"adapter {repo_id} has no {filename}; name the file as {repo_id}:FILE.safetensors") from None
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot download adapter {spec} ({reason}); check the network or pass a local file") from None
    return Adapter(spec, Path(file), repo_id.split("/")[-1], None, *(_from_metadata(Path(file)) or (1.0, Adapter.alpha_source)))


def full_checkpoint(spec: str) -> FullCheckpoint:
    path = Path(spec).expanduser()
    for candidate in (path / "output" / "pipeline" / "transformer", path / "transformer", path):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return FullCheckpoint(spec, candidate, path.name)
    if not path.exists():
        raise UserError(f"full checkpoint not found: {spec}; give a full fine-tune's run folder")
    hint = " (that run trained a LoRA: use --adapter)" if (path / "output" / ADAPTER_FILE).is_file() else ""
    raise UserError(f"no saved transformer in {spec}: expected output/pipeline/transformer (a run with model_type=full){hint}")


def load_adapter_weights(adapter: Adapter) -> dict:
    """The adapter's tensors with keys in diffusers' SD3 layout (`transformer.<layer>.lora_A.weight`, ...)."""
    from safetensors.torch import load_file

    try:
        raw = load_file(str(adapter.file))
    except Exception as exc:
        raise UserError(f"adapter file {adapter.file} cannot be read ({type(exc).__name__}); is it a safetensors LoRA file?") from None
    if any(".lora_down." in k or k.startswith(("lora_unet_", "lora_te")) for k in raw):
        raise UserError(f"adapter {adapter.spec} is in kohya/ComfyUI format; convert it to diffusers format (lora_A/lora_B keys)")
    if any(k.endswith(".alpha") for k in raw):
        raise UserError(f"adapter {adapter.spec} holds per-layer .alpha keys, which diffusers' SD3 loader refuses; save it in diffusers format")
    state = {}
    for key, value in raw.items():
        if key.startswith("base_model.model."):  # PEFT's own save format
            key = "transformer." + key.removeprefix("base_model.model.")
        elif not key.startswith(("transformer.", "text_encoder")):  # bare layer names: the transformer's
            key = "transformer." + key
        state[key] = value
    return state


_ENCODERS = {"text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}


def check_adapter_fits(adapter: Adapter, state: dict, pipe) -> int:
    """Every LoRA pair must target a layer of this pipeline with matching sizes; return the adapter's rank."""
    modules = {"transformer.": dict(pipe.transformer.named_modules())}
    ranks = set()
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[: -len(".lora_A.weight")]
        if layer.startswith("text_encoder_3."):
            raise UserError(f"adapter {adapter.spec} trains the T5 encoder, which diffusers' SD3 loader cannot load")
        prefix = next((p for p in ("transformer.", *_ENCODERS) if layer.startswith(p)), None)
        if prefix is None:
            raise UserError(f"adapter {adapter.spec} has weights for {layer}, which is no part of an SD3 pipeline")
        if prefix not in modules:
            encoder = getattr(pipe, _ENCODERS[prefix], None)
            if encoder is None:
                raise UserError(f"adapter {adapter.spec} trains {_ENCODERS[prefix]}, which this pipeline was loaded without")
            modules[prefix] = dict(encoder.named_modules())
        name = layer.removeprefix(prefix)
        b = state.get(f"{layer}.lora_B.weight")
        if b is None:
            raise UserError(f"adapter {adapter.spec} is incomplete: {layer} has lora_A but no lora_B")
        if a.shape[0] != b.shape[1]:
            raise UserError(f"adapter {adapter.spec} is inconsistent: {name} has rank {a.shape[0]} in lora_A and {b.shape[1]} in lora_B")
        module = modules[prefix].get(name)
        if module is None or not hasattr(module, "in_features"):
            raise UserError(f"adapter {adapter.spec} was trained for another model: this {prefix.rstrip('.')} has no linear layer {name}")
        if (module.in_features, module.out_features) != (a.shape[1], b.shape[0]):
            raise UserError(
                f"adapter {adapter.spec} was trained for another model: {name} maps {module.in_features} to "
                f"{module.out_features} features here, the adapter {a.shape[1]} to {b.shape[0]}"
            )
        ranks.add(int(a.shape[0]))
    if not ranks:
        raise UserError(f"adapter {adapter.spec} holds no LoRA weights (no *.lora_A.weight keys)")
    if adapter.expected_rank is not None and ranks != {adapter.expected_rank}:
        raise UserError(
            f"rank mismatch: run {adapter.label} was configured with lora_rank={adapter.expected_rank} but its "
            f"adapter file has rank {', '.join(map(str, sorted(ranks)))}; was the file replaced?"
        )
    return max(ranks)
