"""One compiled function for every block of a model: `BlockCompiler(fn)` where `fn(block, *tensors, **options)`
runs one block.

Why not `torch.compile(block)` (what accelerate's regional compilation does): that compiles the block's
`__call__`, and a model that runs a block by calling its parts (`block.norm1`, `block.attn`, `block.ff`) never
goes through it, so nothing is compiled. Compiling the function that runs a block instead covers every caller,
plain or inside `torch.utils.checkpoint` (the recomputed forward is then the compiled one too). Dynamo treats the
block's parameters as inputs (`inline_inbuilt_nn_modules`), so identical blocks share one graph and only blocks of
another structure (SD3's last block, which updates no text tokens) or another grad mode (validation) add one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# AOTAutograd's on-disk cache of compiled graphs (on by default) writes the view metadata of graph outputs that
# alias their inputs, and torch before 2.13 serialises it from freed memory: a run that loads such a graph from an
# earlier run's cache replays garbage shapes ("invalid shape dimension -10663...", or a segfault; seen on an H200
# with SD3's LoRA blocks, torch 2.11.0). Fixed upstream by pytorch/pytorch#184774 and #185861.
AUTOGRAD_CACHE_FIXED_IN = (2, 13)

# graphs per compiled function: training and inference, SD3's two block kinds, a dynamic-shape version of each
# after a second resolution; past the limit dynamo silently runs the rest uncompiled
RECOMPILE_LIMIT = 32


def default_backend(recompute_budget: float | None = None):
    """Inductor on a GPU. On a CPU (where sd3fit trains only the tiny test model) AOTAutograd without code
    generation: the same graphs, guards and recompiles, without minutes of C++ compilation per graph; with a
    recompute budget, with inductor's min-cut partitioner (the one that honours the budget) instead of the default."""
    if torch.cuda.is_available():
        return "inductor"
    if recompute_budget is None:
        return "aot_eager"
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=min_cut_rematerialization_partition)


def autograd_cache_safe(version: str = torch.__version__) -> bool:
    """Whether this torch's AOTAutograd cache can be trusted with graphs whose outputs alias their inputs."""
    major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    return (major, minor) >= AUTOGRAD_CACHE_FIXED_IN


class BlockCompiler:
    """Call as `fn` would be called; calls whose options make tracing impossible run `fn` itself.

    `eager_when(**options) -> bool` names those calls (for SD3 in SimpleTuner: attention activations offloaded to
    the CPU through saved-tensor hooks, which dynamo cannot trace).

    `recompute_budget` (0 < b < 1, for blocks that are not checkpointed): each graph keeps for its backward at most
    about that fraction of the activations it would keep, and recomputes the rest there, choosing the operations that
    are cheapest to recompute (torch's `activation_memory_budget` for the min-cut partitioner). Checkpointing a block
    instead recomputes all of its forward, its matmuls included.

    `cuda_graphs` (inductor only, so a CUDA GPU): calls with gradients on run through torch.compile's
    "reduce-overhead" mode, which records each block's forward and backward graphs as CUDA graphs once and replays
    them (torch's CUDA graph trees: one recording per block, since each block's weights are other static inputs),
    so a step launches 24 graphs each way instead of every kernel from Python. Inference calls (validation) keep the
    plain compiled graphs: they run a few times per validation and would only add recordings. A graph's outputs are
    overwritten by its next replay, so gradients must be set to None between steps, not zeroed in place."""

    def __init__(self, fn: Callable, *, backend: str | None = None, mode: str | None = None,
                 eager_when: Callable[..., bool] | None = None, recompute_budget: float | None = None,
                 cuda_graphs: bool = False):
        if recompute_budget is not None and not 0 < recompute_budget < 1:
            raise ValueError(f"recompute_budget must be between 0 and 1 (both excluded), not {recompute_budget}")
        self.fn = fn
        self.recompute_budget = recompute_budget
        self.backend = backend or default_backend(recompute_budget)
        self.backend_name = self.backend if isinstance(self.backend, str) else "aot_eager, min-cut partitioner"
        self.eager_when = eager_when
        if not autograd_cache_safe():
            torch._functorch.config.enable_autograd_cache = False  # process-wide: also graphs compiled by others
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        self.compiled = torch.compile(fn, backend=self.backend, mode=mode)
        # a separate compile of the same function: dynamo keys its cached graphs by backend, so both kinds coexist
        self.cuda_graphs = cuda_graphs and self.backend == "inductor"
        self.graphed = torch.compile(fn, backend="inductor", mode="reduce-overhead") if self.cuda_graphs else None
        self.calls = 0  # compiled calls, for tests and logs
        self.graphed_calls = 0
        self.eager_calls = 0

    def __call__(self, block: torch.nn.Module, *args: Any, **kwargs: Any):
        if self.eager_when is not None and self.eager_when(**kwargs):
            self.eager_calls += 1
            return self.fn(block, *args, **kwargs)
        self.calls += 1
        compiled = self.compiled
        if self.graphed is not None and torch.is_grad_enabled():
            self.graphed_calls += 1
            compiled = self.graphed
        if self.recompute_budget is None:
            return compiled(block, *args, **kwargs)
        # the partitioner reads the budget when it splits a graph (first call, recompiles): set it for our graphs only
        with torch._functorch.config.patch(activation_memory_budget=self.recompute_budget):
            return compiled(block, *args, **kwargs)
