"""No GPU-to-host read inside SimpleTuner's training step (`defer_step_reads`, an sd3fit speed key).

Upstream (simpletuner 4.10.1) `Trainer.train` reads GPU values on the host inline, every step, each read waiting for
everything queued so far: `timesteps_for_logging.tolist()` for W&B's timestep scatter plot (before the forward pass),
`torch.isfinite(loss).all()` to stop on a non-finite loss and `avg_loss.item()` for the logged train_loss (between
the forward and the backward pass), `loss.item()` in a debug message built whether or not debug logging is on, in
the webhook message and in the progress bar. After each the GPU idles while the host queues the next work: 28 % of a
CUDA-graphed LoRA step on an H200 had no kernel running (`results/2026-11-29-graphs-h200/profile`).

The loop is one method of about a thousand lines with these reads inline, so this patch compiles upstream's own
source of `Trainer.train` with exact text replacements (`REPLACEMENTS`; each must be found exactly once, or the run
stops before loading anything) and runs that instead, in upstream's module (its globals, its line numbers):
- the scatter plot's timesteps are gathered only when something reads them (`report_to` W&B or SimpleTuner's own);
- the non-finite check is queued (`sd3fit.speed.host_reads.StepReads`): a non-finite loss still stops the run with
  upstream's message, at most two steps later, and always before a validation or a checkpoint
  (`mark_optimizer_eval`, which upstream calls before both, settles every queued read first);
- train_loss stays a tensor until it is logged; the debug message is built only with debug logging on, the webhook
  message only with a webhook; the progress bar shows the newest loss whose copy has landed (a step or two old);
- what the step logs reaches `accelerator.log` as tensors: the metrics patch (`metrics_log`) copies them behind the
  step and hands them to the trackers a step late, in step order.
What is computed is unchanged; only when the host reads it.

Refused with `cuda_graph_blocks` (`sd3fit.schema`): the tiny model with both on, and whole blocks checkpointed, stopped
at its first replay of the recorded graphs on an H200 (torch 2.11: "graph recording observed an input tensor deallocate
during graph recording that did not occur during replay"); whether the checkpointing or this patch is the cause is not
known yet, so graphs are refused with either.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap

from sd3fit.simpletuner import compat
from sd3fit.speed.host_reads import StepReads

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION

_FINITE_CHECK = '''\
                    if not torch.isfinite(loss.detach()).all():
                        batch_filepaths = prepared_batch.get("filepaths")
                        batch_backend_id = prepared_batch.get("data_backend_id")
                        loss_logs_context = {k: v for k, v in (loss_logs or {}).items()}
                        raise RuntimeError(
                            "Non-finite training loss detected "
                            f"(loss={loss.detach().item()}, data_backend_id={batch_backend_id}, "
                            f"filepaths={batch_filepaths}, loss_logs={loss_logs_context})."
                        )
'''
_DEBUG_MESSAGE = '''\
                    logger.debug(
                        f"Step {self.state['global_step']} of {self.config.max_train_steps}: loss {loss.item()}, \
lr {self.lr}, epoch {epoch}/{self.config.num_train_epochs}, ema_decay_value {ema_decay_value}, train_loss {self.train_loss}"
                    )
'''
_WEBHOOK_MESSAGE = '''\
                    webhook_pending_msg = f"Step {self.state['global_step']} of {self.config.max_train_steps}: loss \
{round(loss.item(), 4)}, lr {self.lr}, epoch {epoch}/{self.config.num_train_epochs}, ema_decay_value {ema_decay_value}, \
train_loss {round(self.train_loss, 4)}"
'''
# (upstream text, its replacement); no replacement adds lines, so tracebacks name upstream's lines
REPLACEMENTS = (
    ('''\
                        for timestep in timesteps_for_logging.tolist():
                            self.timesteps_buffer.append((self.state["global_step"], timestep))
''', '''\
                        for timestep in (timesteps_for_logging.tolist() if self._sd3fit_keep_timesteps else ()):
                            self.timesteps_buffer.append((self.state["global_step"], timestep))
'''),
    (_FINITE_CHECK, '''\
                    self._sd3fit_reads.check_finite(loss, {
                        "step": self.state["global_step"] + 1,
                        "filepaths": prepared_batch.get("filepaths"),
                        "data_backend_id": prepared_batch.get("data_backend_id"),
                        "loss_logs": dict(loss_logs or {}),
                    })
'''),
    ('''\
                    self.train_loss += avg_loss.item() / self.config.gradient_accumulation_steps
''', '''\
                    self.train_loss += avg_loss.detach() / self.config.gradient_accumulation_steps
'''),
    ('''\
                        self.train_diffusion_loss += avg_diffusion_loss.item() / self.config.gradient_accumulation_steps
''', '''\
                        self.train_diffusion_loss += avg_diffusion_loss.detach() / self.config.gradient_accumulation_steps
'''),
    (_DEBUG_MESSAGE, _DEBUG_MESSAGE.replace("logger.debug(", "logger.isEnabledFor(logging.DEBUG) and logger.debug(", 1)),
    (_WEBHOOK_MESSAGE, _WEBHOOK_MESSAGE.replace('train_loss {round(self.train_loss, 4)}"',
                                                'train_loss {round(self.train_loss, 4)}" if self.webhook_handler else ""')),
    ('''\
                    "step_loss": loss.detach().item(),
''', '''\
                    "step_loss": loss.detach(),
'''),
    ('''\
                progress_bar.set_postfix(**progress_logs)
''', '''\
                self._sd3fit_reads.postfix(progress_bar, progress_logs)
'''),
)


def _rewrite(source: str) -> str:
    for old, new in REPLACEMENTS:
        found = source.count(old)
        if found != 1:
            raise RuntimeError(f"{__name__}: SimpleTuner's training loop has {found} copies of the text this patch "
                               f"replaces (expected one), starting {old.strip().splitlines()[0]!r}; it needs updating")
        missing = old.count("\n") - new.count("\n")
        assert missing >= 0, "a replacement may not add lines"
        source = source.replace(old, new + "\n" * missing)  # blank lines keep upstream's line numbers
    return source


def train_without_reads(upstream_train):
    """Upstream's `train` compiled from its rewritten source, in its own module and at its own line numbers."""
    lines, first = inspect.getsourcelines(upstream_train)
    tree = ast.parse(textwrap.dedent(_rewrite("".join(lines))))
    ast.increment_lineno(tree, first - 1)
    module = sys.modules[upstream_train.__module__]
    local: dict = {}
    exec(compile(tree, module.__file__, "exec"), module.__dict__, local)  # noqa: S102 - upstream's own code
    return local[upstream_train.__name__]


def check(trainer_cls) -> None:
    """Fail at start-up, not mid-run, if the loop's text or the seams this patch relies on have moved."""
    compat.require(CHECKED_AGAINST, __name__)
    for name in ("train", "mark_optimizer_eval"):
        if not callable(getattr(trainer_cls, name, None)):
            raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks {name}; this patch needs updating")
    _rewrite(inspect.getsource(trainer_cls.train))


class DeferredReadsTrainer:
    """Mixed in right before `Trainer`; `sd3fit_defer_step_reads` switches it on."""

    sd3fit_defer_step_reads = False
    _sd3fit_reads = None
    _sd3fit_train = None  # the rewritten loop, compiled once per process

    def train(self):
        if not self.sd3fit_defer_step_reads:
            return super().train()
        cls = DeferredReadsTrainer
        if cls._sd3fit_train is None:
            cls._sd3fit_train = train_without_reads(_upstream_train(type(self)))
        from simpletuner.helpers.training.trainer import report_to_contains

        report_to = getattr(self.config, "report_to", None)
        self._sd3fit_keep_timesteps = any(report_to_contains(report_to, name) for name in ("wandb", "simpletuner"))
        self._sd3fit_reads = StepReads()
        return cls._sd3fit_train(self)

    def mark_optimizer_eval(self):
        if self._sd3fit_reads is not None:
            self._sd3fit_reads.settle()  # a non-finite loss stops the run before it is validated or saved
        super().mark_optimizer_eval()


def _upstream_train(trainer_type):
    """The `train` this mixin stands in for: the first one after it in the trainer's method order."""
    mro = trainer_type.__mro__
    for klass in mro[mro.index(DeferredReadsTrainer) + 1:]:
        if "train" in vars(klass):
            return vars(klass)["train"]
    raise RuntimeError(f"{__name__}: no train method after the mixin; this patch needs updating")
