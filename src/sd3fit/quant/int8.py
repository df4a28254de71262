"""A frozen linear layer that multiplies in int8: weights quantized once, activations per token at each call.

Why not a library layer: quanto's, bitsandbytes' and torchao's int8 weight-only layers dequantize the weight to
bf16 on every call and multiply in bf16 (slower than bf16 itself), and torchao's int8 mixed-precision training
re-quantizes the weight on every call because it trains it. A frozen base needs neither: here the weight is stored
once as int8 with one scale per output row, and both matmuls a LoRA step needs from the base run on int8 tensor
cores through torchao's scaled int8 matmul kernel (`torchao.prototype.quantized_training.int8_mm`, Triton):

- forward: y = (x_q @ W_q^T) * s_x[token] * s_w[out], x quantized per token (absmax / 127);
- input gradient: dx = ((g * s_w)_q @ W_q) * s_g[token]: the weight's per-output scale is folded into the incoming
  gradient before it is quantized per token, so the same stored W_q serves both directions;
- no weight gradient (frozen), no copy of the weight in another layout;
- outlier channels: a few input channels far larger than the rest (common in transformer activations) set each
  token's scale and flatten the others to a few int8 steps. The layer multiplies inputs by a block-diagonal Hadamard
  matrix first (blocks of `ROTATION` channels, stored weight rotated alike, as QuaRot and SpinQuant do for LLMs),
  which spreads an outlier over its block: on random inputs with 8 of 1536 channels 20x larger, the output's error
  against bf16 drops from 4.9 % to 1.6 % for about 8 % more multiply-adds (the rotation is a bf16 batched matmul).

Without CUDA (and so in the tests) the same arithmetic runs through `torch._int_mm` on the CPU, the reference path.
The layer subclasses `nn.Linear` so that peft puts LoRA adapters on it as on any linear layer.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

QMAX = 127.0
ROTATION = 128  # Hadamard block, in input channels; layers whose input width it does not divide are not rotated


def hadamard(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix of +-1 (Sylvester's construction; n a power of two), unnormalised."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != n:
        raise ValueError(f"no Sylvester Hadamard matrix of size {n}")
    return h


def rotate(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """t [.., k] times the block-diagonal matrix of `h` blocks (unnormalised: the result is sqrt(b) too large)."""
    b = h.shape[0]
    return (t.reshape(*t.shape[:-1], t.shape[-1] // b, b) @ h).reshape(t.shape)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a 2-D tensor: (int8 values, float32 scale per row) with t ≈ q * scale."""
    absmax = t.detach().abs().amax(dim=1).float()
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    q = torch.round(t.float() / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


@functools.cache  # looked up once: the matmul runs twice per layer and step
def _cuda_kernel():
    try:
        from torchao.prototype.quantized_training.int8_mm import scaled_int8_mm
    except Exception:  # no triton: the reference path
        return None
    return scaled_int8_mm


def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """(a @ b) * a_scale[:, None] * b_scale for int8 `a` [m, k] and `b` [k, n] (any strides), in `dtype`;
    `b_scale` has n values or one."""
    if a.is_cuda and a.shape[0] > 1:  # torchao's kernel checks the row scale's shape after squeezing it
        kernel = _cuda_kernel()
        if kernel is not None:
            return kernel(a, b, a_scale.to(dtype).contiguous(), b_scale.to(dtype).contiguous())
    if not a.is_cuda and a.shape[0] > 16:  # torch._int_mm's CPU kernel: the reference path
        out = torch._int_mm(a, b.contiguous()).float()
    else:  # one row, or no Triton: the same products in float32 (sums of int8 products, rounded past 2^24)
        out = a.float() @ b.float()
    return (out * a_scale[:, None] * b_scale).to(dtype)


class _Int8Matmul(torch.autograd.Function):
    """x [tokens, k] times the stored weight; `h` (or None) the rotation's block, `wscale` with 1/sqrt(b) folded in."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, h: torch.Tensor | None):
        ctx.save_for_backward(qweight, wscale, h)
        xq, xs = quantize_rows(x if h is None else rotate(x, h))
        return scaled_mm(xq, qweight.t(), xs, wscale, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qweight, wscale, h = ctx.saved_tensors
        unit = torch.ones((), device=grad.device, dtype=torch.float32)
        # dx = g W = g (s W_q H / sqrt(b)) with h = H: wscale holds s / sqrt(b), the rotation back is h itself
        gq, gs = quantize_rows(grad.float() * wscale)
        dx = scaled_mm(gq, qweight, gs, unit, grad.dtype)
        return (dx if h is None else rotate(dx, h)), None, None, None


class Int8Linear(nn.Linear):
    """A frozen `nn.Linear` whose weight is int8 (`weight`, one scale per output row in `weight_scale`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        # the Hadamard block the input is rotated by (None: not rotated); the weight is stored rotated alike
        block = ROTATION if in_features % ROTATION == 0 else None
        self.register_buffer("rotation", None if block is None else hadamard(block).to(device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.compute_dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """The int8 copy of a trained linear layer (its weight quantized once, per output row)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device, weight.dtype)
        if layer.rotation is not None:  # W H / sqrt(b): x W^T = (x H)(W H)^T / b for the symmetric H, H H = b I
            b = layer.rotation.shape[0]
            weight = rotate(weight.float(), layer.rotation.float()) / b ** 0.5
        q, scale = quantize_rows(weight)
        layer.weight.data.copy_(q)
        # with rotation, x H is sqrt(b) too large: one 1/sqrt(b) in the scale undoes it
        layer.weight_scale.copy_(scale if layer.rotation is None else scale / layer.rotation.shape[0] ** 0.5)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantized(self) -> torch.Tensor:
        """The weight as the layer multiplies by it (x @ this.T), in its compute dtype."""
        w = self.weight.float() * self.weight_scale[:, None]
        if self.rotation is not None:
            w = rotate(w, self.rotation.float())  # s W_q H / sqrt(b) = W: the 1/sqrt(b) is in the scale
        return w.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.dtype != self.compute_dtype:
            flat = flat.to(self.compute_dtype)
        y = _Int8Matmul.apply(flat, self.weight, self.weight_scale, self.rotation)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def convert(model: nn.Module, keep=lambda name, module: False) -> list[str]:
    """Replace every `nn.Linear` in `model` (not those `keep(name, module)` says to leave) by its `Int8Linear`
    copy, in place; returns the names replaced."""
    replaced = []
    # names, not modules: a list of the modules would keep every replaced bf16 weight alive until the end, so the
    # model would need its bf16 and int8 weights at once (on a GPU, more than a 6 GB card holds)
    for name in [name for name, _ in model.named_modules()]:
        module = model.get_submodule(name)
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not keep(full, child):
                setattr(module, child_name, Int8Linear.from_linear(child))
                child.weight.data = child.weight.data.new_empty(0)  # freed now, even if something holds the old layer
                replaced.append(full)
    return replaced
