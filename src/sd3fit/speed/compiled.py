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

# graphs per compiled function: training and inference, SD3's two block kinds, a dynamic-shape version of each
# after a second resolution; past the limit dynamo silently runs the rest uncompiled
RECOMPILE_LIMIT = 32


def default_backend() -> str:
    """Inductor on a GPU. On a CPU (where sd3fit trains only the tiny test model) AOTAutograd without code
    generation: the same graphs, guards and recompiles, without minutes of C++ compilation per graph."""
    return "inductor" if torch.cuda.is_available() else "aot_eager"


class BlockCompiler:
    """Call as `fn` would be called; calls whose options make tracing impossible run `fn` itself.

    `eager_when(**options) -> bool` names those calls (for SD3 in SimpleTuner: attention activations offloaded to
    the CPU through saved-tensor hooks, which dynamo cannot trace)."""

    def __init__(self, fn: Callable, *, backend: str | None = None, mode: str | None = None,
                 eager_when: Callable[..., bool] | None = None):
        self.fn = fn
        self.backend = backend or default_backend()
        self.eager_when = eager_when
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        self.compiled = torch.compile(fn, backend=self.backend, mode=mode)
        self.calls = 0  # compiled calls, for tests and logs
        self.eager_calls = 0

    def __call__(self, block: torch.nn.Module, *args: Any, **kwargs: Any):
        if self.eager_when is not None and self.eager_when(**kwargs):
            self.eager_calls += 1
            return self.fn(block, *args, **kwargs)
        self.calls += 1
        return self.compiled(block, *args, **kwargs)
