"""Compiled MMDiT blocks (`compile_blocks`, an sd3fit key): each SD3 block runs as one torch.compile graph.

Upstream (simpletuner 4.10.1): SD3's transformer (`simpletuner.helpers.models.sd3.transformer`) runs every block
through the module-level function `_sd3_apply_joint_transformer_block(block, ...)`, which calls the block's parts
(`norm1`, `attn`, `ff`) rather than the block; with gradient checkpointing that function is what
`torch.utils.checkpoint` wraps. SimpleTuner's own compile options go through accelerate, which compiles the model
or, regionally, each block's `__call__`, a path this function never takes: the step stays a few thousand small
kernels launched one by one from Python, and the recompute of checkpointed blocks pays that host time twice.

This patch replaces that module-level function with `sd3fit.speed.compiled.BlockCompiler`, one compiled function
shared by every block, so forward, backward and the checkpointed recompute all run compiled graphs; the upstream
function is kept for calls that offload attention activations (saved-tensor hooks dynamo cannot trace). The first
steps (and the first validation) are slower while the graphs compile. With `recompute_budget` (an sd3fit key) the
blocks are not checkpointed by upstream; each compiled block's graph keeps part of its activations instead. With
`cuda_graph_blocks` (an sd3fit key) the training graphs are replayed as CUDA graphs (see BlockCompiler).
"""

from __future__ import annotations

import importlib
import inspect

from sd3fit.simpletuner import compat
from sd3fit.speed.compiled import BlockCompiler

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
MODULE = "simpletuner.helpers.models.sd3.transformer"
FUNCTION = "_sd3_apply_joint_transformer_block"
_PARAMETERS = ["block", "hidden_states", "encoder_hidden_states", "temb_hidden", "temb_context",
               "joint_attention_kwargs", "offload_attention"]


def _upstream(module):
    current = getattr(module, FUNCTION, None)
    if isinstance(current, BlockCompiler):  # applied before in this process
        return current.fn
    if not callable(current) or list(inspect.signature(current).parameters) != _PARAMETERS:
        raise RuntimeError(f"{__name__}: SimpleTuner's {MODULE}.{FUNCTION} is gone or takes other arguments; "
                           "this patch needs updating")
    return current


def _offloads_attention(joint_attention_kwargs=None, offload_attention=False) -> bool:
    return bool(offload_attention)


def apply(on: bool, recompute_budget: float | None = None, cuda_graphs: bool = False) -> BlockCompiler | None:
    """Compile SD3's blocks from now on in this process (`on`), or put upstream's function back; with
    `recompute_budget`, each block's graph keeps that fraction of its activations, with `cuda_graphs` training
    calls replay CUDA graphs (see BlockCompiler)."""
    compat.require(CHECKED_AGAINST, __name__)
    module = importlib.import_module(MODULE)
    upstream = _upstream(module)
    if not on:
        setattr(module, FUNCTION, upstream)
        return None
    compiler = BlockCompiler(upstream, eager_when=_offloads_attention, recompute_budget=recompute_budget,
                             cuda_graphs=cuda_graphs)
    setattr(module, FUNCTION, compiler)
    return compiler


def stats() -> dict | None:
    """How the blocks ran in this process (for result.json), or None when the patch is off."""
    current = getattr(importlib.import_module(MODULE), FUNCTION, None)
    if not isinstance(current, BlockCompiler):
        return None
    out = {"backend": current.backend_name, "compiled_calls": current.calls, "eager_calls": current.eager_calls,
           "cuda_graphs": current.cuda_graphs, "graphed_calls": current.graphed_calls}
    if current.recompute_budget is not None:
        out["recompute_budget"] = current.recompute_budget
    return out
