"""GPU values read on the host a step late, so that reading them never makes the host wait for work queued after them.

`tensor.item()` copies on the current stream and waits for it: for everything queued so far, not only for the kernel
that made the value. A training loop that reads its loss that way every step stops the host until the GPU has
finished the step, and the GPU then idles while the host fetches the next batch and queues its first kernels.

`Pending` copies each one-element GPU tensor of a dict of values to pinned host memory right away, behind the work
that made it (a non-blocking copy), and records an event after the copies; `read()` waits for that event only, so
read a step later it does not wait at all. torch offers the pieces (pinned buffers, non-blocking copies, events) but
no helper that does this for a dict of logged values. On a CPU, or for values that are not one-element GPU tensors,
nothing is copied and `read()` returns the values as numbers at once.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

LAG = 2  # reads left outstanding at most: the host runs this many steps ahead of the values it reports


def _gpu_scalar(value: Any) -> bool:
    return torch.is_tensor(value) and value.device.type == "cuda" and value.numel() == 1


def _number(value: Any) -> Any:
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    return value


class Pending:
    """One dict of values whose one-element GPU tensors are on their way to host memory."""

    __slots__ = ("values", "_host", "_event")

    def __init__(self, values: dict[str, Any]):
        self.values = values
        self._host: dict[str, torch.Tensor] = {}
        self._event = None
        for key, value in values.items():
            if _gpu_scalar(value):
                buffer = torch.empty((), dtype=value.dtype, pin_memory=True)
                buffer.copy_(value.detach().reshape(()), non_blocking=True)
                self._host[key] = buffer
        if self._host:
            self._event = torch.cuda.Event()
            self._event.record()

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def read(self) -> dict[str, Any]:
        """The values, each one-element tensor as a Python number; waits for the copies if they are still on the way."""
        if self._event is not None:
            self._event.synchronize()
        return {key: self._host[key].item() if key in self._host else _number(value)
                for key, value in self.values.items()}


class Queue:
    """Pending dicts in order; `ready()` hands back, oldest first, those whose copies have landed, and waits for the
    oldest while more than `lag` are outstanding."""

    def __init__(self, lag: int = LAG):
        self.lag = lag
        self._items: deque[tuple[Pending, Any]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, values: dict[str, Any], context: Any = None) -> None:
        self._items.append((Pending(values), context))

    def ready(self, everything: bool = False) -> list[tuple[dict[str, Any], Any]]:
        out = []
        while self._items and (everything or len(self._items) > self.lag or self._items[0][0].ready()):
            pending, context = self._items.popleft()
            out.append((pending.read(), context))
        return out


class NonFiniteLoss(RuntimeError):
    pass


class StepReads:
    """What a training loop reads from the GPU every step, read a step late: the non-finite-loss check and the
    progress bar's numbers."""

    def __init__(self, lag: int = LAG):
        self._finite = Queue(lag)
        self._postfix = Queue(lag)

    def check_finite(self, loss: torch.Tensor, context: dict[str, Any]) -> None:
        """Queue this step's check; raise for an earlier step whose loss turned out not finite."""
        loss = loss.detach()
        self._finite.put({"bad": ~torch.isfinite(loss).all(), "loss": loss if loss.numel() == 1 else None}, context)
        self._raise_if_bad(self._finite.ready())

    def postfix(self, bar, values: dict[str, Any]) -> None:
        """Show the newest numbers whose copies have landed (a step or two old) on the progress bar."""
        self._postfix.put(dict(values))
        landed = self._postfix.ready()
        if landed:
            bar.set_postfix(**landed[-1][0])

    def settle(self) -> None:
        """Wait for every queued read and raise if any loss was not finite (before validation or saving)."""
        self._postfix.ready(everything=True)
        self._raise_if_bad(self._finite.ready(everything=True))

    @staticmethod
    def _raise_if_bad(landed: list[tuple[dict[str, Any], Any]]) -> None:
        for values, context in landed:
            if values["bad"]:
                context = dict(context or {})
                logs = {k: _number(v) for k, v in (context.pop("loss_logs", None) or {}).items()}
                raise NonFiniteLoss(
                    f"Non-finite training loss detected at step {context.get('step')} (loss={values['loss']}, "
                    f"data_backend_id={context.get('data_backend_id')}, filepaths={context.get('filepaths')}, "
                    f"loss_logs={logs})."
                )
