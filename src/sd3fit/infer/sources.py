"""Where an inference column's weights come from, checked before any image is made.

An adapter is a Hub id (`owner/name`, optionally `owner/name:file.safetensors`), a local `.safetensors` file or a
run folder; a full fine-tune is a run folder (its saved pipeline's transformer) or a transformer folder. Each check
fails with one line that names the problem and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sd3fit.errors import UserError
from sd3fit.hub import looks_like_path

ADAPTER_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Adapter:
    spec: str  # what the user typed
    file: Path
    label: str
    expected_rank: int | None = None  # the training run's lora_rank, when the adapter comes from a run folder


@dataclass(frozen=True)
class FullCheckpoint:
    spec: str
    transformer: Path
    label: str


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    return json.loads(path.read_text()).get("simpletuner", {}) if path.is_file() else {}


def adapter(spec: str) -> Adapter:
    path = Path(spec).expanduser()
    if path.is_dir():
        candidates = [path / "output" / ADAPTER_FILE, path / ADAPTER_FILE]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise UserError(f"no LoRA adapter in {spec}: expected output/{ADAPTER_FILE} (a LoRA run folder) or {ADAPTER_FILE}")
        rank = _run_config(path).get("lora_rank")
        return Adapter(spec, found, path.name, int(rank) if rank else None)
    if spec.endswith(".safetensors") or looks_like_path(spec):
        if not path.is_file():
            raise UserError(f"adapter file not found: {spec}; give a .safetensors file, a run folder or a Hub id")
        return Adapter(spec, path, path.stem if path.stem != "pytorch_lora_weights" else path.parent.name)
    return _hub_adapter(spec)


def _hub_adapter(spec: str) -> Adapter:
    from huggingface_hub import get_token, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    repo_id, _, filename = spec.partition(":")
    filename = filename or ADAPTER_FILE
    try:
        file = hf_hub_download(repo_id, filename)
    except GatedRepoError:
        raise UserError(f"adapter {repo_id} is gated: accept its terms at https://huggingface.co/{repo_id} and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        hint = "" if get_token() else ", or log in with `hf auth login` if it is private"
        raise UserError(f"adapter {repo_id} was not found on the Hugging Face Hub: check the id{hint}") from None
    except EntryNotFoundError:
        raise UserError(f"adapter {repo_id} has no {filename}; name the file as {repo_id}:FILE.safetensors") from None
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot download adapter {spec} ({reason}); check the network or pass a local file") from None
    return Adapter(spec, Path(file), repo_id.split("/")[-1])


def full_checkpoint(spec: str) -> FullCheckpoint:
    path = Path(spec).expanduser()
    for candidate in (path / "output" / "pipeline" / "transformer", path / "transformer", path):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return FullCheckpoint(spec, candidate, path.name)
    if not path.exists():
        raise UserError(f"full checkpoint not found: {spec}; give a full fine-tune's run folder")
    raise UserError(f"no saved transformer in {spec}: expected output/pipeline/transformer (a run with model_type=full)")


def load_adapter_weights(adapter: Adapter) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(adapter.file))
    except Exception as exc:
        raise UserError(f"adapter file {adapter.file} cannot be read ({type(exc).__name__}); is it a safetensors LoRA file?") from None


def check_adapter_fits(adapter: Adapter, state: dict, transformer) -> int:
    """Every LoRA pair must target a layer of this transformer with matching sizes; return the adapter's rank."""
    modules = dict(transformer.named_modules())
    ranks = set()
    pairs = 0
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key[: -len(".lora_A.weight")]
        if layer.startswith("text_encoder"):
            continue  # text-encoder LoRA: diffusers loads it into the encoders
        b = state.get(f"{layer}.lora_B.weight")
        name = layer.removeprefix("transformer.")
        if b is None:
            raise UserError(f"adapter {adapter.spec} is incomplete: {layer} has lora_A but no lora_B")
        if a.shape[0] != b.shape[1]:
            raise UserError(f"adapter {adapter.spec} is inconsistent: {name} has rank {a.shape[0]} in lora_A and {b.shape[1]} in lora_B")
        module = modules.get(name)
        if module is None or not hasattr(module, "in_features"):
            raise UserError(f"adapter {adapter.spec} was trained for another model: this transformer has no layer {name}")
        if (module.in_features, module.out_features) != (a.shape[1], b.shape[0]):
            raise UserError(
                f"adapter {adapter.spec} was trained for another model: {name} maps {module.in_features} to "
                f"{module.out_features} features here, the adapter {a.shape[1]} to {b.shape[0]}"
            )
        ranks.add(int(a.shape[0]))
        pairs += 1
    if pairs == 0:
        raise UserError(f"adapter {adapter.spec} holds no LoRA weights for the transformer (no *.lora_A.weight keys)")
    rank = max(ranks)
    if adapter.expected_rank is not None and ranks != {adapter.expected_rank}:
        raise UserError(
            f"rank mismatch: run {adapter.label} was configured with lora_rank={adapter.expected_rank} but its "
            f"adapter file has rank {', '.join(map(str, sorted(ranks)))}; was the file replaced?"
        )
    return rank
