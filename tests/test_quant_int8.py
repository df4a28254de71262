"""The frozen int8 linear layer (sd3fit.quant.int8): its arithmetic against bf16, with and without the Hadamard
rotation, on SD3 Medium's layer shapes; shapes the int8 matmul cannot take; LoRA adapters from peft on top, trained
and saved as usual. On a CPU the reference path (torch._int_mm) runs; on a GPU the same tests run torchao's kernel."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sd3fit.bench import layers
from sd3fit.quant import int8
from sd3fit.quant.int8 import Int8Linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SD3_SHAPES = [(1536, 1536), (1536, 6144), (6144, 1536), (4096, 1536)]  # attention, MLP in/out, context embedder


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def outlier_inputs(tokens: int, width: int, device, factor: float = 20.0) -> torch.Tensor:
    """Random activations whose first 8 channels are `factor` times larger, as transformer activations have."""
    x = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
    x[:, :8] *= factor
    return x


def run(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    return y, dx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, n", SD3_SHAPES)
def test_output_and_input_gradient_stay_close_to_bf16_with_outlier_channels(device, k, n):
    torch.manual_seed(0)
    linear = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    x = outlier_inputs(300, k, device)
    grad = torch.randn(300, n, device=device, dtype=torch.bfloat16)
    y_ref, dx_ref = run(linear, x, grad)
    layer = Int8Linear.from_linear(linear)
    assert layer.rotation is not None  # every SD3 Medium width is a multiple of the block
    y, dx = run(layer, x, grad)
    assert y.dtype == dx.dtype == torch.bfloat16
    assert rel(y, y_ref) < 3e-2 and rel(dx, dx_ref) < 3e-2, (rel(y, y_ref), rel(dx, dx_ref))
    assert rel(layer.dequantized(), linear.weight) < 2e-2
    assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad and layer.weight.grad is None


def test_the_rotation_is_what_keeps_outlier_channels_accurate():
    torch.manual_seed(0)
    linear = nn.Linear(1536, 1536, dtype=torch.bfloat16)
    x = outlier_inputs(300, 1536, "cpu")
    grad = torch.randn(300, 1536, dtype=torch.bfloat16)
    y_ref, _ = run(linear, x, grad)
    rotated = Int8Linear.from_linear(linear)
    plain_block, int8.ROTATION = int8.ROTATION, 7  # a block no width divides: no rotation
    try:
        plain = Int8Linear.from_linear(linear)
    finally:
        int8.ROTATION = plain_block
    assert plain.rotation is None
    y_rot, _ = run(rotated, x, grad)
    y_plain, _ = run(plain, x, grad)
    assert rel(y_rot, y_ref) < 0.5 * rel(y_plain, y_ref)  # 1.7 % against 4.9 %


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens, k, n", [(1, 1536, 64), (16, 100, 24), (17, 96, 40), (40, 1536, 9216)])
def test_shapes_the_int8_matmul_cannot_take_still_compute_right(device, tokens, k, n):
    """One token (the modulation projections' input), 16 tokens or fewer (torch._int_mm needs more), widths that
    are not multiples of 8 or of the rotation block, a batch dimension."""
    torch.manual_seed(1)
    linear = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, tokens, k, device=device, dtype=torch.bfloat16)
    grad = torch.randn(2, tokens, n, device=device, dtype=torch.bfloat16)
    y_ref, dx_ref = run(linear, x, grad)
    y, dx = run(layer, x, grad)
    assert y.shape == y_ref.shape and dx.shape == x.shape
    assert rel(y, y_ref) < 3e-2 and rel(dx, dx_ref) < 3e-2


def test_convert_replaces_linear_layers_but_those_kept():
    model = nn.ModuleDict({"attn": nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 64)),
                           "norm": nn.Linear(128, 256)}).to(torch.bfloat16)
    replaced = int8.convert(model, keep=lambda name, module: name.startswith("norm"))
    assert replaced == ["attn.0", "attn.2"]
    assert isinstance(model["attn"][0], Int8Linear) and type(model["norm"]) is nn.Linear
    assert int8.convert(model) == ["norm"]  # an Int8Linear is never converted again


def test_convert_lets_go_of_each_bf16_weight_as_soon_as_it_is_replaced(monkeypatch):
    """On a GPU the base is converted in place: were the replaced layers' bf16 weights kept until the end, the model
    would hold both copies at once (on a 6 GB card that ran out of memory while loading)."""
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128)) for _ in range(3)])
    blocks = blocks.to(torch.bfloat16)
    old = [layer for block in blocks for layer in block]
    live = []  # bf16 weight elements still held by the layers replaced so far, at each conversion
    real = Int8Linear.from_linear

    def counting(linear):
        live.append(sum(layer.weight.numel() for layer in old if not isinstance(layer, Int8Linear)
                        and layer is not linear and not any(layer is m for m in blocks.modules())))
        return real(linear)

    monkeypatch.setattr(Int8Linear, "from_linear", staticmethod(counting))
    assert len(int8.convert(blocks)) == 6
    assert live == [0] * 6  # every earlier layer's weight was already freed
    assert all(layer.weight.numel() == 0 for layer in old)  # even though this test still holds the old layers


def test_peft_lora_trains_on_the_int8_base_and_saves_only_the_adapter():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256)).to(torch.bfloat16)
    reference = [layer.weight.detach().clone() for layer in (base[0], base[2])]
    int8.convert(base)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype.is_floating_point for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    x, target = torch.randn(64, 256, dtype=torch.bfloat16), torch.randn(64, 256, dtype=torch.bfloat16)
    losses = []
    for _ in range(20):
        loss = (model(x).float() - target.float()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    state = get_peft_model_state_dict(model)
    assert state and all("lora_A" in name or "lora_B" in name for name in state)
    for layer, weight in zip((model.base_model.model[0], model.base_model.model[2]), reference):
        assert rel(layer.base_layer.dequantized(), weight) < 2e-2  # the base never moved


def test_the_int8_base_is_a_preset_value_checked_against_the_gpu_before_loading(monkeypatch, tmp_path):
    from sd3fit import fit, host, schema, train
    from sd3fit.errors import UserError
    from sd3fit.simpletuner.patches import int8_base

    values = schema.validate({**_demo_values(), "base_model_precision": "int8-sd3fit", "compile_blocks": True})
    assert values["base_model_precision"] == "int8-sd3fit"
    with pytest.raises(UserError, match="needs model_type=lora"):
        schema.validate({**_demo_values(), "base_model_precision": "int8-sd3fit", "model_type": "full"})
    # SimpleTuner is handed its own value; sd3fit keeps its
    assert int8_base.split({"base_model_precision": "int8-sd3fit", "seed": 1}) == (
        {"base_model_precision": "no_change", "seed": 1}, "int8-sd3fit")
    assert int8_base.split({"base_model_precision": "int8-quanto"}) == ({"base_model_precision": "int8-quanto"}, None)
    fit.check_capability(values, None)  # no GPU: the reference path
    fit.check_capability(values, (8, 0))
    with pytest.raises(UserError, match=r"compute capability 8\.0 or later\), and this GPU has 7\.5") as caught:
        fit.check_capability(values, (7, 5))
    assert "\n" not in str(caught.value)
    fit.check_capability({**values, "base_model_precision": "no_change"}, (7, 5))
    monkeypatch.setattr(host, "gpu_capability", lambda: (7, 5))
    with pytest.raises(UserError, match="int8-sd3fit"):
        train.prepare("demo", ["base_model_precision=int8-sd3fit"], "x", str(tmp_path))
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_only_the_blocks_projections_become_int8():
    from sd3fit.simpletuner.patches.int8_base import keep

    assert not keep("transformer_blocks.3.attn.to_q", None) and not keep("transformer_blocks.0.ff.net.2", None)
    assert keep("transformer_blocks.3.norm1.linear", None) and keep("transformer_blocks.3.norm1_context.linear", None)
    assert keep("context_embedder", None) and keep("proj_out", None) and keep("time_text_embed.linear_1", None)


def _demo_values() -> dict:
    from sd3fit import presets

    return dict(presets.read(presets.CONFIG_DIR / "demo.json"))


def test_bench_layers_times_every_block_shape_and_records_the_machine(tmp_path):
    from conftest import one_line_error, run_sd3fit

    out = tmp_path / "layers"
    proc = run_sd3fit("bench-layers", "--out", str(out), "--token-scale", "0.01", "--repeats", "1", "--no-compile",
                      timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((out / "layers.json").read_text())
    assert {r["layer"] for r in record["rows"]} == {s[0] for s in layers.SHAPES} and len(record["rows"]) == 6
    assert all(r["bf16_ms"] > 0 and r["int8_ms"] > 0 and r["output_error"] < 3e-2 for r in record["rows"])
    assert record["facts"]["torch"] and record["command"].startswith("sd3fit bench-layers")
    assert "One block's linear layers, eager" in (out / "layers.md").read_text()
    again = run_sd3fit("bench-layers", "--out", str(out), "--token-scale", "0.01")
    assert "--out" in one_line_error(again)  # results are never overwritten
    assert "--token-scale" in one_line_error(run_sd3fit("bench-layers", "--token-scale", "2"))
