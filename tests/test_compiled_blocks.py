"""Compiled MMDiT blocks (sd3fit.speed.compiled, sd3fit.simpletuner.patches.compiled_blocks)."""

import pytest
import torch

from sd3fit import presets, schema
from sd3fit.errors import UserError
from sd3fit.simpletuner.patches import compiled_blocks


def tiny_lora_transformer(checkpointing: bool):
    from peft import LoraConfig
    from simpletuner.helpers.models.sd3.transformer import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                  attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                  caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights="gaussian"))
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def step(model):
    """One forward and backward; the output and the LoRA gradients."""
    torch.manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 10, 32),
                  pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]))
    model.zero_grad()
    out = model(**inputs, return_dict=False)[0]
    out.float().pow(2).mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.fixture
def restore_upstream():
    yield
    compiled_blocks.apply(False)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_compute_what_upstream_does_with_lora_and_checkpointing(checkpointing, restore_upstream):
    from torch._dynamo.utils import counters

    model = tiny_lora_transformer(checkpointing)
    eager_out, eager_grads = step(model)
    counters.clear()
    compiler = compiled_blocks.apply(True)
    assert compiled_blocks.apply(True).fn is compiler.fn  # applied twice: still upstream's function underneath
    out, grads = step(model)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    blocks = len(model.transformer_blocks)
    stats = compiled_blocks.stats()
    # checkpointed blocks run their compiled forward a second time in backward
    assert stats["compiled_calls"] == blocks * (2 if checkpointing else 1) and stats["eager_calls"] == 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    # identical blocks share a graph; SD3's last block (no text-token update) is another
    assert counters["stats"]["unique_graphs"] <= 3
    compiled_blocks.apply(False)
    assert compiled_blocks.stats() is None


def test_cuda_graph_blocks_train_as_upstream_and_leave_inference_to_the_plain_graphs(restore_upstream):
    """Training calls go through the CUDA-graph compile where there is one (a CUDA GPU), two steps so the second
    replays what the first recorded; inference calls always run the plain compiled graphs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_lora_transformer(False).to(device)

    def on_device_step():
        with torch.device(device):
            return step(model)

    eager_out, eager_grads = on_device_step()
    compiler = compiled_blocks.apply(True, cuda_graphs=True)
    assert compiler.cuda_graphs == torch.cuda.is_available()  # inductor only: no graphs on a CPU
    for _ in range(2):
        out, grads = on_device_step()
        torch.testing.assert_close(out, eager_out, rtol=1e-3, atol=1e-4)
        for got, want in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    blocks = len(model.transformer_blocks)
    with torch.no_grad(), torch.device(device):
        torch.manual_seed(1)
        model(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 10, 32),
              pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]))
    stats = compiled_blocks.stats()
    assert stats["compiled_calls"] == 3 * blocks and stats["cuda_graphs"] == compiler.cuda_graphs
    assert stats["graphed_calls"] == (2 * blocks if compiler.cuda_graphs else 0)


@pytest.mark.parametrize("overrides, words", [
    (["compile_blocks=false", "set_grads_to_none=true"], "set compile_blocks=true"),
    (["compile_blocks=true"], "set_grads_to_none=true"),
])
def test_cuda_graph_blocks_are_refused_where_they_cannot_apply(overrides, words):
    with pytest.raises(UserError, match=words):
        presets.load("lora-24gb", ["cuda_graph_blocks=true", "set_grads_to_none=false", *overrides])
    presets.load("lora-24gb", ["cuda_graph_blocks=true", "compile_blocks=true", "set_grads_to_none=true"])


def test_attention_offload_runs_upstreams_function(restore_upstream):
    compiler = compiled_blocks.apply(True)
    assert compiler.eager_when(joint_attention_kwargs=None, offload_attention=True)
    assert not compiler.eager_when(joint_attention_kwargs={}, offload_attention=False)


def test_patch_refuses_an_upstream_function_that_changed(monkeypatch):
    import simpletuner.helpers.models.sd3.transformer as upstream

    monkeypatch.setattr(upstream, compiled_blocks.FUNCTION, lambda block, hidden_states: None)
    with pytest.raises(RuntimeError, match="needs updating"):
        compiled_blocks.apply(True)


@pytest.mark.parametrize("override, words", [
    ("base_model_precision=int8-quanto", "bf16 base"),
    ("musubi_blocks_to_swap=4", "musubi_blocks_to_swap"),
    ("ramtorch_transformer_percent=50", "RamTorch"),
])
def test_compiled_blocks_refuse_weights_that_move_or_are_quantized(override, words):
    extra = ["ramtorch=true"] if "ramtorch" in override else []
    with pytest.raises(UserError, match=words):
        presets.load("lora-24gb", ["compile_blocks=true", override, *extra])
    presets.load("lora-24gb", ["compile_blocks=false", "cuda_graph_blocks=false", override, *extra])  # the patch off: accepted


def test_a_recompute_budget_keeps_fewer_activations_for_the_same_gradients():
    from sd3fit.speed.compiled import BlockCompiler

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.norm = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64), torch.nn.LayerNorm(64)

    def run_block(block, x):  # cheap pointwise work between two matmuls, as in an MLP
        h = torch.nn.functional.gelu(block.up(block.norm(x)))
        return x + block.down(torch.sin(h) * torch.cos(h) + h.exp().clamp(max=3))

    torch.manual_seed(0)
    block, x0 = Block(), torch.randn(128, 64)

    def saved_and_grad(fn):
        saved = []
        x = x0.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = fn(block, x)
        out.pow(2).sum().backward()
        return sum(saved), x.grad

    full, grad = saved_and_grad(BlockCompiler(run_block))
    kept = [full]
    for budget in (0.5, 0.1):  # the budget counts against keeping every activation, not against the default graph
        saved, budget_grad = saved_and_grad(BlockCompiler(run_block, recompute_budget=budget))
        assert saved < 0.75 * kept[-1] and torch.allclose(budget_grad, grad, atol=1e-6)
        kept.append(saved)
    with pytest.raises(ValueError, match="between 0 and 1"):
        BlockCompiler(run_block, recompute_budget=1.0)


@pytest.mark.parametrize("overrides, words", [
    (["recompute_budget=0.3"], "needs compile_blocks=true"),
    (["recompute_budget=0.3", "compile_blocks=true", "gradient_checkpointing=true"], "gradient_checkpointing=false"),
    (["recompute_budget=1.5", "compile_blocks=true", "gradient_checkpointing=false"], "between 0 and 1"),
])
def test_a_recompute_budget_is_refused_where_it_cannot_apply(overrides, words):
    with pytest.raises(UserError, match=words):
        presets.load("lora-24gb", ["compile_blocks=false", "cuda_graph_blocks=false", *overrides])
    presets.load("lora-24gb", ["compile_blocks=true", "gradient_checkpointing=false", "recompute_budget=0.3"])


def test_compiling_blocks_turns_off_the_autograd_cache_on_a_torch_that_corrupts_it():
    """torch < 2.13 writes aliased outputs' view metadata from freed memory into AOTAutograd's cache; a later run
    that loads it crashes (or segfaults) with garbage shapes, so the trainer must not use that cache there."""
    from sd3fit.speed import compiled

    assert not compiled.autograd_cache_safe("2.11.0+cu130") and not compiled.autograd_cache_safe("2.12.1")
    assert compiled.autograd_cache_safe("2.13.0") and compiled.autograd_cache_safe("3.0.0a0")
    with torch._functorch.config.patch(enable_autograd_cache=True):  # restored afterwards, whatever the test did
        compiled.BlockCompiler(lambda block, x: x)
        assert torch._functorch.config.enable_autograd_cache is compiled.autograd_cache_safe()


@pytest.fixture
def restore_peft_forward():
    from peft.tuners.lora.layer import Linear
    from simpletuner.helpers.utils import ramtorch as upstream

    forward, flag = Linear.forward, upstream._peft_lora_forward_patched
    yield
    Linear.forward, upstream._peft_lora_forward_patched = forward, flag
    compiled_blocks.apply(False)


def test_peft_lora_forward_comes_back_where_nothing_needs_moving(restore_peft_forward):
    """SimpleTuner wraps peft's LoRA forward for the whole process once RamTorch streams any layer (a text encoder
    too); the wrapper breaks every compiled block at each LoRA layer. plain_lora_forward takes it off when the
    trained model holds no RamTorch layer and sits on the training device, and keeps it otherwise."""
    from torch._dynamo.utils import counters
    from simpletuner.helpers.utils import ramtorch as upstream

    from sd3fit.simpletuner.patches import lora_forward

    lora_forward.remember()
    model = tiny_lora_transformer(checkpointing=True)
    upstream._maybe_patch_peft_lora_forward()  # what SimpleTuner's RamTorch set-up does
    assert lora_forward.state() == "wrapped"
    compiled_blocks.apply(True)
    torch._dynamo.reset()
    counters.clear()
    wrapped_out, wrapped_grads = step(model)
    assert sum(counters["graph_break"].values()) > 0

    assert not lora_forward.unwrap(model, torch.device("cuda", 0))  # its weights are elsewhere: kept
    assert lora_forward.state() == "wrapped"
    assert lora_forward.unwrap(model, torch.device("cpu")) and lora_forward.state() == "peft"
    upstream.ensure_available()  # validation asks again: upstream does not wrap it a second time
    assert lora_forward.state() == "peft"
    torch._dynamo.reset()
    counters.clear()
    out, grads = step(model)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, wrapped_out)
    for got, want in zip(grads, wrapped_grads, strict=True):
        torch.testing.assert_close(got, want)
