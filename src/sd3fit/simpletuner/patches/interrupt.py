"""Stop at the next step boundary on SIGINT or SIGTERM, with a checkpoint to resume from.

Upstream (simpletuner 4.10.1) installs no signal handler for training: SIGINT raises KeyboardInterrupt wherever the
loop happens to be (halfway through an optimizer step, or a checkpoint save) and SIGTERM ends the process at once;
either way the steps since the last scheduled checkpoint are lost. Its own way to stop is `Trainer.abort()` (stops
the batch fetcher and the data backends, sets `should_abort`), which `Trainer._exit_on_signal()`, called at the top
of each trip through the training loop before a batch is fetched, turns into `StopIteration("Training run received
abort signal.")`; nothing is saved on that path.

This patch:
- `install()`: SIGINT and SIGTERM set a flag. Before the training loop runs (loading, caching: nothing trained can
  be lost) a signal raises KeyboardInterrupt at once; so does a second signal at any time. When the signal is the
  SIGTERM that sd3fit asks Linux to send if sd3fit dies, the process's output, which went to sd3fit through a pipe,
  is sent to train.log from then on, so the checkpoint is saved instead of failing on the closed pipe.
- `InterruptibleTrainer` (a mixin before `Trainer`) overrides `_exit_on_signal`: at a step boundary with the flag
  set (and no gradient accumulation half done; with several processes the flag is shared first, so all of them
  stop at the same step), it saves a checkpoint of the current step as upstream saves its scheduled ones (clear
  `-tmp` leftovers, `checkpoint_state_save`) unless the step already has a complete one, then calls `abort()` and lets
  upstream's check raise StopIteration. The launcher records the run as `interrupted`; `sd3fit train --resume`
  continues it from that checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from sd3fit.runs import CHECKPOINT_GUARD as GUARD
from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt:
    """Which signal asked the trainer to stop (None: none), and whether the training loop is running."""

    def __init__(self, log: Path | None = None):
        self.signum: int | None = None
        self.training = False
        self.log = log
        self._parent = os.getppid()

    def handle(self, signum, frame) -> None:
        if self.log is not None and os.getppid() != self._parent:
            # sd3fit, which reads this process's output into train.log, is gone (the SIGTERM it asked Linux to send
            # when it dies): write to train.log directly, or the next line would fail on the closed pipe
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            self.log = None
        first = self.signum is None
        self.signum = self.signum or signum
        if not first or not self.training:
            raise KeyboardInterrupt
        print(f"{signal.Signals(signum).name} received: stopping after this step, saving a checkpoint", flush=True)


def install(log: Path | None = None) -> Interrupt:
    """Handle SIGINT and SIGTERM from now on; `log`: the file to write to if the process reading this one's output
    has died."""
    compat.require(CHECKED_AGAINST, __name__)
    interrupt = Interrupt(log)
    for signum in SIGNALS:
        signal.signal(signum, interrupt.handle)
    return interrupt


def check(trainer_cls) -> None:
    compat.require(CHECKED_AGAINST, __name__)
    for name in ("_exit_on_signal", "abort", "checkpoint_state_save", "checkpoint_state_cleanup_temp", "train"):
        if not callable(getattr(trainer_cls, name, None)):
            raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks {name}; this patch needs updating")


class InterruptibleTrainer:
    sd3fit_interrupt: Interrupt | None = None  # set by the launcher

    def _sd3fit_stop_requested(self) -> bool:
        requested = self.sd3fit_interrupt is not None and self.sd3fit_interrupt.signum is not None
        accelerator = self.accelerator
        if getattr(accelerator, "num_processes", 1) > 1:
            import torch

            flag = torch.tensor([1.0 if requested else 0.0], device=accelerator.device)
            requested = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return requested

    def _exit_on_signal(self):
        # a step boundary: gradients in sync means no accumulation is half done
        if getattr(self.accelerator, "sync_gradients", True) and self._sd3fit_stop_requested() and not self.should_abort:
            step = int(self.state.get("global_step", 0))
            output_dir = self.config.output_dir
            path = os.path.join(output_dir, f"checkpoint-{step}")
            if step > 0 and not os.path.isfile(os.path.join(path, GUARD)):
                if self.accelerator.is_main_process:
                    self.checkpoint_state_cleanup_temp(output_dir)
                    shutil.rmtree(path, ignore_errors=True)  # cut off while saving once: the rename would fail on it
                self.checkpoint_state_save(output_dir)
            self.abort()
        return super()._exit_on_signal()

    def train(self):
        if self.sd3fit_interrupt is not None:
            self.sd3fit_interrupt.training = True
        try:
            return super().train()
        finally:
            if self.sd3fit_interrupt is not None:
                self.sd3fit_interrupt.training = False
