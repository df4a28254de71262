"""Optimizer state kept in CPU memory for good and brought to the GPU one block at a time, for that block's step.

With gradient release (`sd3fit.lean.release`) each block of the model is stepped on its own during the backward
pass, so only that block's state needs to be on the GPU, for the moment of its step: SD3 Medium's 8-bit AdamW state
(3.8 GiB, as large as the bf16 weights) then takes 0.2 GiB of GPU memory, which is what lets a full fine-tune fit an
8 GB card. Each step copies the whole state to the GPU and back (2 x 3.8 GiB over PCIe), asynchronously on the
training stream from and to pinned buffers that are allocated once.

Why not a library: torchao's `CPUOffloadOptimizer` and DeepSpeed's ZeRO-Offload also keep the state in CPU memory,
but step there too, in fp32 (about a second a step for 2 B parameters on a 16-core host, and 24 GiB of host memory
for AdamW's fp32 state); torchao's 8-bit state has no CPU step. Here the step stays the optimizer's own, on the GPU
(torchao's low-bit AdamW with stochastic rounding, torch's, optimi's), and only its state moves.

Host memory: torch's pinned-memory allocator rounds each buffer up to a power of two, so the buffers take more than
the state (about 1.6x for SD3 Medium's shapes; one arena for the whole state would not); the fit check's RAM figure
is the peak resident memory measured with them.

Tensor subclasses (torchao's 8-bit state) move as the plain tensors they are made of (`__tensor_flatten__`). The
0-dim tensors an optimizer keeps (step counters) stay where the optimizer put them. The copies are ordered with the
step by running on the stream current where the step runs (the backward pass's, where gradient release steps);
`settle()` waits for the copies back before anything on the host reads the state (saving a checkpoint);
`load_state_dict` puts loaded state straight into CPU memory instead of the GPU (torch places it on each parameter's
device).
"""

from __future__ import annotations

import torch


class _Home:
    """One state tensor's CPU copy: a plain tensor, or the inner tensors of a subclass and how to rebuild it."""

    def __init__(self, value: torch.Tensor, pin: bool):
        if type(value) is torch.Tensor:
            self.kind, self.names, self.ctx = None, ("data",), None
        else:
            names, self.ctx = value.__tensor_flatten__()
            self.kind, self.names = type(value), tuple(names)
        self.size, self.stride = value.size(), value.stride()
        self.buffers = {name: torch.empty_like(t, device="cpu", pin_memory=pin)
                        for name, t in self._inner(value).items()}
        self.nbytes = sum(b.numel() * b.element_size() for b in self.buffers.values())
        self.store(value)

    def _inner(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"data": value} if self.kind is None else {name: getattr(value, name) for name in self.names}

    def store(self, value: torch.Tensor) -> None:
        for name, t in self._inner(value).items():
            self.buffers[name].copy_(t, non_blocking=True)

    def fetch(self, device: torch.device) -> torch.Tensor:
        # a copy even on the buffers' own device, so the step never writes into the CPU buffers themselves
        inner = {name: t.to(device, non_blocking=True, copy=True) for name, t in self.buffers.items()}
        if self.kind is None:
            return inner["data"]
        return self.kind.__tensor_unflatten__(inner, self.ctx, self.size, self.stride)

    def view(self) -> torch.Tensor:
        """The CPU buffers as the optimizer's own type (what `state_dict` shows)."""
        if self.kind is None:
            return self.buffers["data"]
        return self.kind.__tensor_unflatten__(dict(self.buffers), self.ctx, self.size, self.stride)


def _streamed(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


class StateStream:
    """`fetch(params)` before the step of those parameters puts their state on their device; `store(params)` after
    it copies the state back to its CPU buffers and drops the device copies. Between the two, `optimizer.state[p]`
    holds device tensors; otherwise it holds CPU tensors (views of the buffers), so `state_dict()` and checkpoints
    see ordinary CPU state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.pin = torch.cuda.is_available()
        self._homes: dict[int, dict[str, _Home]] = {}
        self.bytes_moved = 0  # both directions, since start: for logs and tests
        optimizer.register_load_state_dict_pre_hook(self._before_load)
        optimizer.register_load_state_dict_post_hook(self._after_load)
        self._loaded: dict[int, dict] = {}

    def fetch(self, params) -> None:
        for p in params:
            homes = self._homes.get(id(p))
            if not homes:
                continue  # no state yet: the optimizer creates it on the parameter's device in this step
            state = self.optimizer.state[p]
            for key, home in homes.items():
                state[key] = home.fetch(p.device)
                self.bytes_moved += home.nbytes

    def store(self, params) -> None:
        for p in params:
            state = self.optimizer.state.get(p)
            if not state:
                continue
            homes = self._homes.setdefault(id(p), {})
            for key, value in list(state.items()):
                if not _streamed(value):
                    continue
                home = homes.get(key)
                if home is None:
                    home = homes[key] = _Home(value, self.pin)
                else:
                    home.store(value)
                self.bytes_moved += home.nbytes
                state[key] = home.view()

    def settle(self) -> None:
        """Wait until every copy back to CPU memory has landed (before the host reads the state)."""
        if self.pin:
            torch.cuda.synchronize()

    @property
    def cpu_bytes(self) -> int:
        return sum(home.nbytes for homes in self._homes.values() for home in homes.values())

    # loading a checkpoint: torch's Optimizer.load_state_dict casts every state tensor to its parameter's device,
    # which would put the whole state on the GPU at once; the tensors are taken out before and homed after
    def _before_load(self, optimizer, state_dict):
        # saved parameter ids in the order torch pairs them with the optimizer's parameters
        saved_ids = (pid for group in state_dict["param_groups"] for pid in group["params"])
        order = {saved: n for n, saved in enumerate(saved_ids)}
        self._loaded, kept = {}, {}
        for index, state in state_dict["state"].items():
            taken = {key: value for key, value in state.items() if _streamed(value)} if index in order else {}
            if taken:  # (an id no group names is left to torch, as it would be without streaming)
                self._loaded[order[index]] = taken
            kept[index] = {key: value for key, value in state.items() if key not in taken}
        state_dict = dict(state_dict)  # the caller's dictionaries stay as they were
        state_dict["state"] = kept
        return state_dict

    def _after_load(self, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._homes.clear()
        for position, taken in self._loaded.items():
            p = params[position]
            state = optimizer.state[p]
            homes = self._homes.setdefault(id(p), {})
            for key, value in taken.items():
                homes[key] = _Home(value.detach().to("cpu"), self.pin)
                state[key] = homes[key].view()
        self._loaded = {}
