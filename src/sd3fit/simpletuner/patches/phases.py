"""Tell sd3fit's run phases (`sd3fit.measure.phases`) where SimpleTuner's run is: loading, text-embedding and latent
caching, training, validation, saving.

Checked against simpletuner 4.10.1, where `train.py`'s `_run_training` loads the text encoders and VAE, fills the
caches inside `Trainer.init_data_backend` (`TextEmbeddingCache.compute_embeddings_for_prompts`, then
`VAECache.process_buckets`), loads the transformer, and calls `Trainer.train`; inside `train`, checkpoints go through
`Trainer.checkpoint_state_save`, images through `Validation.run_validations` (the last one with
`validation_type="final"`), and the final adapter or pipeline is written after a `model_save` lifecycle event.
Nothing here changes what those methods do: `apply` wraps the three class methods so each runs inside its phase, and
`PhasedTrainer` (mixed in before `Trainer`) does the same for checkpoints, training and the final save.
"""

from __future__ import annotations

import functools

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
_TRAINER_METHODS = ("checkpoint_state_save", "_emit_event", "train")

_phases = None  # the run's sd3fit.measure.phases.Phases, set by apply


def _during(name: str, only_from: tuple[str, ...] | None = None):
    """Run the wrapped method inside phase `name`; with `only_from`, only when the run is in one of those phases (the
    text-embedding cache is also read during validation, which stays validation)."""

    def decorate(method):
        @functools.wraps(method)
        def wrapped(*args, **kwargs):
            if _phases is None or (only_from is not None and _phases.current not in only_from):
                return method(*args, **kwargs)
            with _phases.during(name):
                return method(*args, **kwargs)

        return wrapped

    return decorate


def _validations(method):
    run_in_phase = _during("validation")(method)

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return run_in_phase(self, *args, **kwargs)
        finally:
            if _phases is not None and kwargs.get("validation_type") == "final":
                _phases.enter("saving")  # upstream writes the final adapter or pipeline right after

    return wrapped


def check(trainer_cls) -> None:
    compat.require(CHECKED_AGAINST, __name__)
    missing = [name for name in _TRAINER_METHODS if not callable(getattr(trainer_cls, name, None))]
    if missing:
        raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks {', '.join(missing)}; this patch needs updating")


def apply(phases) -> None:
    """Wrap the caching and validation entry points (once per process) and report to `phases`."""
    global _phases
    compat.require(CHECKED_AGAINST, __name__)
    from simpletuner.helpers.caching.text_embeds import TextEmbeddingCache
    from simpletuner.helpers.caching.vae import VAECache
    from simpletuner.helpers.training.validation import Validation

    _phases = phases
    targets = (
        (TextEmbeddingCache, "compute_embeddings_for_prompts", _during("text_embeds", only_from=("loading",))),
        (VAECache, "process_buckets", _during("latents", only_from=("loading", "text_embeds"))),
        (Validation, "run_validations", _validations),
    )
    for cls, name, wrap in targets:
        compat.wrap_once(cls, name, wrap, "__sd3fit_phase__", __name__)


class PhasedTrainer:
    def checkpoint_state_save(self, *args, **kwargs):
        if _phases is None:
            return super().checkpoint_state_save(*args, **kwargs)
        with _phases.during("saving"):
            return super().checkpoint_state_save(*args, **kwargs)

    def _emit_event(self, event, *args, **kwargs):
        if _phases is not None and isinstance(event, dict) and event.get("key") == "model_save" and event.get("status") == "running":
            _phases.enter("saving")
        return super()._emit_event(event, *args, **kwargs)

    def train(self):
        if _phases is not None:
            _phases.enter("training")
        return super().train()
