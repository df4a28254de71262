"""Run SimpleTuner's training for one prepared run folder, with sd3fit's patches applied.

    python -m sd3fit.simpletuner.launcher runs/<name>
    accelerate launch -m sd3fit.simpletuner.launcher runs/<name>

`sd3fit train` prepares the folder (validated config, checked dataset) and starts this module in it. The run
sequence is SimpleTuner 4.10.1's own `simpletuner/train.py` `__main__` block: build the Trainer from a config dict,
run `_run_training` inside `dynamo_config_context` and a copied context, clean up. The subclass below adds what
sd3fit needs at SimpleTuner's existing seams; it overrides no training logic.
"""

from __future__ import annotations

import contextvars
import json
import os
import signal
import sys
import time
import traceback
import tracemalloc
from pathlib import Path

from sd3fit import resume
from sd3fit.errors import UserError
from sd3fit.measure import settings as measure_settings
from sd3fit.runs import Run, last_checkpoint
from sd3fit.schema import speed_patches
from sd3fit.simpletuner import compat
from sd3fit.simpletuner.patches import (compiled_blocks, cpu_pin_memory, decode_offload, fused_optimizer,
                                        gradient_release, int8_base, interrupt, lora_forward, metrics_log,
                                        optimizer_offload, phases, prefetch, ramtorch_bound, ramtorch_sync,
                                        step_measure, step_reads, tracemalloc_off, trainable_params, vae_tiles,
                                        validation_images)

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _is_main_process() -> bool:
    return _rank() == 0


def memory_budget(bench_budget: str | None, own: dict) -> float | None:
    """The GiB the run's GPU memory is held within: a benchmark's budget (environment) or the preset's
    `gpu_memory_limit_gib`, the smaller when both are set; None for no cap."""
    found = [float(bench_budget)] if bench_budget else []
    if own.get("gpu_memory_limit_gib") is not None:
        found.append(float(own["gpu_memory_limit_gib"]))
    return min(found) if found else None


def _make_trainer(options: dict, measurement, own: dict, stop: interrupt.Interrupt | None = None):
    from simpletuner.helpers.training.trainer import Trainer

    step_measure.check(Trainer)
    gradient_release.check(Trainer)
    interrupt.check(Trainer)
    phases.check(Trainer)
    optimizer_offload.check(Trainer)
    trainable_params.check(Trainer)
    ramtorch_sync.check(Trainer)
    lora_forward.check(Trainer)
    lora_forward.remember()  # peft's forward, before SimpleTuner's RamTorch set-up can wrap it
    int8_base.check(Trainer)
    step_reads.check(Trainer)
    options, int8_precision = int8_base.split(options)  # SimpleTuner's parser knows only its own precisions
    fused_optimizer.apply()
    phases.apply(measurement.phases)
    vae_tiles.apply(own.get("vae_tile_size"))
    decode_offload.apply(bool(own.get("offload_transformer_for_decode")))
    compiled_blocks.apply(bool(own.get("compile_blocks")), own.get("recompute_budget"),
                          bool(own.get("cuda_graph_blocks")))
    tracemalloc_off.apply(bool(own.get("skip_tracemalloc")))
    prefetch.apply(bool(own.get("prefetch_batches")))
    ramtorch_bound.apply(own.get("ramtorch_copy_ahead_gib"))
    validation_images.apply(measurement.write_images if _is_main_process() else None)

    class SD3FitTrainer(interrupt.InterruptibleTrainer, phases.PhasedTrainer, step_measure.MeasuredTrainer,
                        fused_optimizer.FusedOptimizerTrainer, trainable_params.TrainableListTrainer,
                        ramtorch_sync.RamTorchSyncTrainer, lora_forward.PlainLoraForwardTrainer,
                        int8_base.Int8BaseTrainer, gradient_release.ReleasingTrainer,
                        optimizer_offload.OffloadingTrainer, step_reads.DeferredReadsTrainer, Trainer):
        """SimpleTuner's Trainer with sd3fit's run phases, per-run metrics, ranges and profiler, adamw_bf16 stepped
        by multi-tensor kernels on request, no RamTorch syncs or LoRA device checks where no RamTorch layer trains,
        an int8 base that multiplies in int8, gradient release that works with every optimizer, optimizer state out
        of the way of validation, a checkpoint before stopping on SIGINT or SIGTERM, and on request no host read of
        GPU values inside the step."""

        sd3fit_measurement = measurement
        sd3fit_fused_optimizer = bool(own.get("fused_optimizer"))
        sd3fit_cache_trainable_params = bool(own.get("cache_trainable_params"))
        sd3fit_skip_ramtorch_syncs = bool(own.get("skip_ramtorch_syncs"))
        sd3fit_plain_lora_forward = bool(own.get("plain_lora_forward"))
        sd3fit_int8_base = int8_precision
        sd3fit_release_by_block = bool(own.get("release_by_block"))
        sd3fit_offload_optimizer_state = bool(own.get("offload_optimizer_state"))
        sd3fit_stream_state = bool(own.get("stream_optimizer_state"))
        sd3fit_interrupt = stop
        sd3fit_defer_step_reads = bool(own.get("defer_step_reads"))

        def init_trackers(self):
            super().init_trackers()
            metrics_log.apply(self.accelerator, measurement, defer=self.sd3fit_defer_step_reads)

    import torch

    options = prefetch.options(options, bool(own.get("prefetch_batches")), torch.cuda.is_available())
    config = {f"--{key}": value for key, value in options.items()}
    # never fall back to a config/config.json found in the working directory: the run's config is the only source
    config["__skip_config_fallback__"] = True
    return SD3FitTrainer(config=config, exit_on_error=True)


def _measurement(run: Run, config: dict):
    from sd3fit.measure.session import Measurement

    options = config["simpletuner"]
    settings = measure_settings.from_preset(config.get("sd3fit", {}))
    # samples one trip through the loop trains on, over all processes
    samples = int(options.get("train_batch_size") or 1) * int(os.environ.get("WORLD_SIZE", "1"))
    own = run.rank_dir(_rank())  # each process measures itself; rank 0 writes the run's files
    own.mkdir(parents=True, exist_ok=True)
    return Measurement(settings, run.dir, own / run.metrics.name, samples, is_main=_is_main_process(), own_dir=own)


def _model_facts(trainer) -> dict[str, int]:
    """Parameter counts and quantized layers of the trained transformer: what the preset actually produced."""
    net = getattr(getattr(trainer, "model", None), "model", None)
    if net is None:
        return {}
    net = trainer.accelerator.unwrap_model(net)
    params = list(net.parameters())
    quant_libraries = ("optimum.quanto", "torchao", "bitsandbytes", "sd3fit.quant")
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "quantized_modules": sum(1 for m in net.modules() if type(m).__module__.startswith(quant_libraries)),
    }


def _optimizer_facts(trainer) -> dict:
    """The class and settings of the optimizer the run stepped with: what the preset's optimizer keys produced."""
    optimizer = getattr(trainer, "optimizer", None)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    if optimizer is None:
        return {}
    simple = (bool, int, float, str, type(None))

    def plain(value) -> bool:  # what result.json can hold
        return isinstance(value, simple) or (isinstance(value, tuple) and all(isinstance(v, simple) for v in value))

    settings = {key: list(value) if isinstance(value, tuple) else value
                for key, value in getattr(optimizer, "defaults", {}).items() if plain(value)}
    return {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}", **settings}


def _artifacts(run: Run, options: dict) -> dict[str, str]:
    out = Path(options["output_dir"])
    found = {}
    if options.get("model_type", "full") == "lora":
        adapter = out / "pytorch_lora_weights.safetensors"
        if adapter.is_file():
            found["adapter"] = str(adapter)
    else:
        pipeline = out / "pipeline"
        transformer = pipeline / "transformer"
        # a folder without weights is no model (seen once after an FSDP2 run on two CPU processes)
        if transformer.is_dir() and any(p.suffix in (".safetensors", ".bin") for p in transformer.iterdir()):
            found["pipeline"] = str(pipeline)
            found["transformer"] = str(transformer)
    checkpoint = last_checkpoint(run)
    if checkpoint is not None:
        found["last_checkpoint"] = str(checkpoint.path)
    return found


def _caught_ooms(torch) -> int:
    try:
        return int(torch.cuda.memory_stats().get("num_ooms", 0)) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _where(measurement, trainer) -> str:
    """The phase the run is in, with the step during training: what an out-of-memory error reports."""
    phase = measurement.phases.current
    if phase == "training" and trainer is not None:
        return f"training step {int(getattr(trainer, 'state', {}).get('global_step', 0)) + 1}"
    return phase


def _first_oom_phase(measure: dict) -> str | None:
    return next((name for name, part in measure.get("phases", {}).items() if part.get("ooms")), None)


def _speed(own: dict, trainer=None) -> dict:
    """Which speed patches the run had on, and what they did."""
    out: dict = {"patches": speed_patches(own),
                 "tracemalloc": tracemalloc.is_tracing()}  # upstream leaves it on unless skip_tracemalloc
    blocks = compiled_blocks.stats()
    if blocks is not None:
        out["compile_blocks"] = blocks
    in_model = getattr(trainer, "_sd3fit_ramtorch_in_model", None)  # asked only with ramtorch on a GPU
    if in_model is not None:
        out["ramtorch_syncs"] = in_model  # False: skip_ramtorch_syncs left out upstream's syncs
    bound = ramtorch_bound.stats()
    if bound is not None:
        out["ramtorch_bound"] = bound  # how often the host waited for RamTorch's copies, per text encoder
    lora = getattr(trainer, "sd3fit_lora_forward", None)
    if lora is not None:
        out["lora_forward"] = lora  # "peft": plain_lora_forward took SimpleTuner's RamTorch wrapper off
    fetcher = getattr(trainer, "bf", None)  # upstream's BatchFetcher, there only when dataloader_prefetch is on
    if fetcher is not None:
        out["prefetch"] = {"queue": fetcher.queue.maxsize, "to_device": fetcher.device_prefetcher is not None}
    release = getattr(trainer, "sd3fit_release", None)
    if release is not None:  # gradient release: parameter steps, and how many calls made them
        out["gradient_release"] = {"parameter_steps": release.steps, "bucket_steps": release.bucket_steps,
                                   "compiled_buckets": release.step_many is not None}
        stream = release.stream
        if stream is not None:
            out["gradient_release"]["streamed_state_bytes"] = stream.cpu_bytes  # held in CPU memory
    return out


def run_options(config: dict) -> dict:
    """The options SimpleTuner gets: the run's own over sd3fit's defaults for every run."""
    return {**config.get("defaults", {}), **config["simpletuner"]}


def train(run: Run) -> dict:
    """Train and return the result record (also written to result.json by the main process)."""
    config = run.read_config()
    options = run_options(config)
    compat.require(CHECKED_AGAINST, "sd3fit's launcher")
    stop = interrupt.install(run.log)
    resume_from = os.environ.get(resume.RESUME_ENV)
    if resume_from:
        # an absolute path: SimpleTuner takes the folder of that name in output_dir, the run's own
        options["resume_from_checkpoint"] = resume_from
    cpu_fix = cpu_pin_memory.apply()

    import multiprocessing

    from simpletuner.helpers.training.dynamo import dynamo_config_context
    from simpletuner.train import _run_training

    try:
        # upstream's __main__ asks for fork: its data workers rely on inheriting state
        multiprocessing.set_start_method("fork")
    except RuntimeError:
        pass

    import torch

    started = time.time()
    result = {"status": "failed", "run": str(run.dir), "cpu_pin_memory_fix": cpu_fix}
    if resume_from:
        result["resumed_from"] = resume_from
        if _is_main_process():
            resume.tensorboard_purge(run.dir / "tensorboard", resume.checkpoint_step(resume_from), run.read_metrics())
    trainer = cap = None
    budget = memory_budget(os.environ.get("SD3FIT_GPU_BUDGET_GIB"), config.get("sd3fit", {}))
    if budget is not None and torch.cuda.is_available():
        from sd3fit.measure.memory import GpuCap

        cap = GpuCap(torch, budget)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # several processes and no GPU: they train on the CPU and talk through gloo (what accelerate's `--cpu` sets;
        # without it each process would train alone)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    measurement = _measurement(run, config)  # before the model loads: memory history covers loading too
    if cap is not None:
        measurement.memory.outside_listener = cap.leave_room  # the cap leaves room for what a real card holds
    try:
        trainer = _make_trainer(options, measurement, config.get("sd3fit", {}), stop)
        with dynamo_config_context(trainer.config):
            contextvars.copy_context().run(_run_training, trainer)
        for key, facts in (("transformer", _model_facts), ("optimizer", _optimizer_facts)):
            try:
                result[key] = facts(trainer)
            except Exception as exc:  # a bookkeeping failure must not turn a finished run into a failed one
                result[key] = {"error": f"{type(exc).__name__}: {exc}"}
        step = int(trainer.state.get("global_step", 0))
        target = int(options.get("max_train_steps") or 0)
        result["global_step"] = step
        result["processes"] = int(getattr(trainer.accelerator, "num_processes", 1))  # that trained together
        if target and step < target:
            # SimpleTuner returns quietly when, e.g., no dataloader could be built; that is not a finished run
            result["error"] = f"training stopped at step {step} of {target}; see train.log"
        else:
            result["status"] = "finished"
    except SystemExit as exc:
        # upstream calls sys.exit(0) when it found no usable training data
        result["error"] = f"SimpleTuner exited ({exc.code}) before finishing; see train.log"
    except torch.OutOfMemoryError as exc:
        result["out_of_memory"] = True
        result["oom_phase"] = _where(measurement, trainer)
        result["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0]}"
        measurement.on_oom()  # while the failing frames still hold their tensors
        raise
    except (StopIteration, KeyboardInterrupt) as exc:
        if stop.signum is None:
            result["error"] = f"{type(exc).__name__}: {exc}"
            raise
        # stopped by SIGINT/SIGTERM: at a step boundary with a checkpoint saved, or before training began
        result["status"] = "interrupted"
        result["signal"] = signal.Signals(stop.signum).name
        result["global_step"] = int((getattr(trainer, "state", None) or {}).get("global_step", 0))
        try:
            if trainer is not None and trainer.accelerator is not None:
                trainer.accelerator.end_training()  # the trackers' last rows and files, as a finished run has them
        except Exception as end_exc:  # the checkpoint is saved already; keep the record
            result["end_training_error"] = f"{type(end_exc).__name__}: {end_exc}"
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if trainer is not None:
            trainer.cleanup()
        result["wall_seconds"] = round(time.time() - started, 3)
        result["speed"] = _speed(config.get("sd3fit", {}), trainer)
        result["artifacts"] = _artifacts(run, options)
        if result["status"] == "finished" and _is_main_process():  # it exports the weights
            wanted = "adapter" if options.get("model_type", "full") == "lora" else "transformer"
            if wanted not in result["artifacts"]:
                result["status"] = "failed"
                result["error"] = (f"training finished but the final export wrote no {wanted} weights to "
                                   f"{Path(options['output_dir'])}; see train.log")
        if cap is not None:
            result["gpu_budget"] = cap.facts()
        try:
            measurement.close()  # idempotent: end_training already closed it when training got that far
            result["measure"] = measurement.summary()
        except Exception as exc:  # after a CUDA fault these calls fail too; keep the original error and the record
            result["measure_error"] = f"{type(exc).__name__}: {exc}"
        ooms = _caught_ooms(torch)
        if ooms:
            # SimpleTuner catches some out-of-memory errors (a validation image, a VAE cache batch) and goes on or
            # exits quietly: the run did not fit even when training finished
            result["out_of_memory"] = True
            result["caught_ooms"] = ooms
            result.setdefault("oom_phase", _first_oom_phase(result.get("measure", {})) or _where(measurement, trainer))
        # rank 0 writes the run's result.json; every other process its own (sd3fit.ranks gathers them)
        (run.rank_dir(_rank()) / run.result.name).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sd3fit.simpletuner.launcher RUN_DIR", file=sys.stderr)
        return 2
    run = Run(Path(argv[0]).resolve())
    if not run.config.is_file():
        print(f"sd3fit: error: {run.dir} has no config.json; prepare runs with `sd3fit train`", file=sys.stderr)
        return 2
    try:
        result = train(run)
    except UserError as exc:
        print(f"sd3fit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # SIGINT or SIGTERM while starting up (see patches.interrupt): nothing trained yet
        print("stopped before training began", file=sys.stderr)
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
    if result["status"] == "interrupted":
        return 128 + signal.Signals[result["signal"]].value
    if result["status"] != "finished":
        print(f"sd3fit: error: {result.get('error')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
