"""The `sd3fit` command: `train`, `demo`, `runs`, `presets`, `options`, `bench`, `bench-layers`, `report`, `digest`,
`infer`.

Bad input ends with one line on stderr, `sd3fit: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sd3fit.errors import UserError

LOG_TAIL_LINES = 20  # of train.log, shown when training fails


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a preset option, e.g. max_train_steps=200")
    p.add_argument("--name", help="run folder name under the runs folder (default: <preset>-<date>-<time>)")
    p.add_argument("--runs-dir", help="folder that holds the run folders (default: $SD3FIT_RUNS_DIR or ./runs)")
    p.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) for `accelerate launch`; 1 runs directly")
    p.add_argument("--dry-run", action="store_true", help="check the preset, model and dataset, print the config, train nothing")
    p.add_argument("--gpu", metavar="SIZE",
                   help="the card to fit, e.g. 12GB (default: the GPU nvidia-smi finds); with CONFIG lora or full, "
                        "the fastest preset of that kind that fits it is chosen")
    p.add_argument("--skip-fit-check", action="store_true",
                   help="train even when the GPU (or the RAM, for offloading presets) has less memory than this "
                        "configuration's measured need")
    p.add_argument("--verbose", action="store_true",
                   help="show everything the trainer prints (by default only sd3fit's lines and a progress line; "
                        "the run's train.log always has all of it)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue this run (its folder, or its name under the runs folder) from its last complete "
                        "checkpoint, with its own config (only a longer max_train_steps=N may be given)")


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an invalid choice, a missing value) keep sd3fit's contract: one line, exit 2; the
    message names the argument and, for choices, lists them; `-h` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"sd3fit: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sd3fit", description="Fine-tune Stable Diffusion 3 Medium with SimpleTuner on one small GPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train from a preset: sd3fit train [CONFIG] [key=value ...]")
    p.add_argument("config", nargs="?", help="preset JSON file or name in config/, or lora / full for the fastest "
                                             "preset that fits the GPU (default: the offline demo)")
    _train_args(p)

    p = sub.add_parser("demo", help="train the tiny offline demo (config/demo.json)")
    _train_args(p)

    p = sub.add_parser("runs", help="list the run folders: status, steps, last loss, peak GPU memory, weights")
    p.add_argument("--runs-dir", help="folder that holds the run folders (default: $SD3FIT_RUNS_DIR or ./runs)")

    p = sub.add_parser("presets", help="list the presets in config/")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table of the presets' main options")

    p = sub.add_parser("options", help="list the option names a preset may use")
    p.add_argument("pattern", nargs="?", default="", help="show only options containing this text")

    from sd3fit.bench import speed

    p = sub.add_parser("bench", help="train each preset for a few steps and record time and memory per preset")
    p.add_argument("--presets", nargs="+", metavar="PRESET", help="presets to run (default: every preset in config/ but the demo)")
    p.add_argument("--steps", type=int, default=25, help="measured steps after warm-up (default 25)")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps before measuring starts (default 5)")
    p.add_argument("--resolution", type=int, default=1024, help="training resolution in px: 1024 or 512 (default 1024)")
    p.add_argument("--gpu-budget", nargs="+", default=["none"], metavar="SIZE",
                   help="cap GPU memory to answer 'would it fit this card?': 24GB, 16GB, 22.5GiB, none, or card "
                        "(each preset under the card it names); several values run every preset under each (default none)")
    p.add_argument("--model", default="auto",
                   help="Hub id or diffusers folder; 'random' builds SD3 Medium's architecture with random weights; "
                        "'auto' (default) uses the presets' model if its weights are here, else random")
    p.add_argument("--speed", default=speed.SD3FIT, choices=speed.MODES,
                   help="sd3fit's speed patches: as the presets set them (sd3fit, default), all off (stock), a stock "
                        "and an sd3fit run back to back (both), or both plus one run per patch with only it off (each)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list this many times in turn (A B A B ...): the report gives the median over "
                        "rounds and each preset's step over the first's, round by round (default 1)")
    p.add_argument("--num-processes", type=int, default=1,
                   help="processes (GPUs) each run trains with under `accelerate launch` (default 1); rows give "
                        "images/s over all of them and the largest peak of any one")
    p.add_argument("--no-validation", action="store_true", help="skip the one validation at the last step")
    p.add_argument("--keep-weights", action="store_true", help="keep each run's trained adapter or model (deleted by default)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (TFLOP/s) for MFU, if sd3fit does not know it")
    p.add_argument("--out", help="new or empty folder for results (default: benchmarks/bench-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the benchmark in --out: run only what has no row yet")

    p = sub.add_parser("bench-layers", help="SD3 Medium's linear layers at 1024 px: bf16 against sd3fit's int8 layer")
    p.add_argument("--out", help="new or empty folder for layers.json and layers.md "
                                 "(default: benchmarks/layers-<date>-<time>)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per layer and setting (default 20)")
    p.add_argument("--token-scale", type=float, default=1.0,
                   help="fraction of the 1024 px token counts to use (default 1; smaller for a quick look on a CPU)")
    p.add_argument("--no-compile", action="store_true", help="time eager layers only")

    p = sub.add_parser("report", help="summary table and figures from run folders or benchmark results")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR|RESULTS",
                   help="run folders (each with metrics.jsonl), or benchmark results (results.jsonl or its folder)")
    p.add_argument("--out", help="new or empty folder for the report (default: reports/report-<date>-<time>)")

    p = sub.add_parser("digest", help="text digest of profiler traces: top operators and kernels, where time goes")
    p.add_argument("path", help="a .pt.trace.json file, or a run folder holding traces")
    p.add_argument("--top", type=int, default=10, help="operators and kernels to list (default 10)")

    from sd3fit.infer import cli as infer_cli

    infer_cli.add_parser(sub)
    return parser


def _split_config(args) -> tuple[str | None, list[str]]:
    """`train a=b` means the demo with an override, not a preset named 'a=b'."""
    config = getattr(args, "config", None)
    overrides = list(args.overrides)
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    return config, overrides


def cmd_train(args) -> int:
    from sd3fit import launch, train
    from sd3fit.runs import shown

    started = time.time()
    config, overrides = _split_config(args)
    if args.resume:
        return _resume(args, config, overrides, started)
    launch.check_count(args.num_processes)
    chosen, why = train.choose(config, overrides, args.gpu, args.num_processes)
    if why:
        print(f"sd3fit: {why}", flush=True)
    prepared = train.prepare(chosen, overrides, name=args.name, runs_dir=args.runs_dir,
                             check_fit=not args.skip_fit_check, gpu=args.gpu, processes=args.num_processes)
    launch.check_processes(prepared.preset.values, args.num_processes)
    if args.dry_run:
        print(json.dumps(prepared.record, indent=2))
        print(f"dry run: preset, model and dataset are fine; a run would go to {shown(prepared.run.dir)}")
        return 0
    run = train.write(prepared)
    print(f"sd3fit: training {prepared.preset.path.name} in {shown(run.dir)}", flush=True)
    return _launch(prepared, args, started)


def _resume(args, config: str | None, overrides: list[str], started: float) -> int:
    from sd3fit import launch, resume
    from sd3fit.runs import shown

    given = [flag for flag, value in (("a preset", config), ("--name", args.name), ("--gpu", args.gpu),
                                      ("--runs-dir", args.runs_dir)) if value]
    if given:
        raise UserError(f"--resume continues a run with its own config and folder; drop {', '.join(given)}")
    prepared, checkpoint = resume.prepare(args.resume, overrides)
    launch.check_processes(prepared.preset.values, args.num_processes)
    steps = prepared.record["simpletuner"].get("max_train_steps")
    if args.dry_run:
        print(f"dry run: {shown(prepared.run.dir)} would resume from {checkpoint.path.name} (step {checkpoint.step} "
              f"of {steps})")
        return 0
    env = resume.write(prepared, checkpoint)
    print(f"sd3fit: resuming {shown(prepared.run.dir)} from {checkpoint.path.name} (step {checkpoint.step} of {steps})",
          flush=True)
    return _launch(prepared, args, started, env)


def _launch(prepared, args, started: float, env: dict[str, str] | None = None) -> int:
    from sd3fit import launch
    from sd3fit.runs import shown

    from sd3fit.console import Console

    run = prepared.run
    console = None if args.verbose else Console(run.metrics, prepared.record["simpletuner"].get("max_train_steps"))
    code = launch.launch(prepared, num_processes=args.num_processes, env=env, forward_signals=True, console=console)
    print(launch.summary(run, time.time() - started))
    result = run.read_result() or {}
    if code in (130, 143):
        from sd3fit.runs import last_checkpoint

        interrupted = result.get("status") == "interrupted"
        where = f"at step {result['global_step']}" if interrupted else "before the trainer wrote a result"
        then = (f"continue with: sd3fit train --resume {shown(run.dir)}" if last_checkpoint(run) is not None
                else "it has no checkpoint to continue from")
        print(f"sd3fit: interrupted {where}; {then}", file=sys.stderr)
        return code
    if code != 0:
        if console is not None:  # what the trainer said last, which the console did not show
            print("\n".join(launch.log_tail(run, LOG_TAIL_LINES)), file=sys.stderr)
        # the first line only: SimpleTuner's messages run to many lines, and the log keeps all of them
        reason = (result.get("error") or f"the trainer exited with status {code}").splitlines()[0]
        print(f"sd3fit: error: training failed: {reason}; full log: {shown(run.log)}", file=sys.stderr)
        return code
    return 0


def cmd_presets(args) -> int:
    from sd3fit import presets

    rows = [(name, presets.read(presets.CONFIG_DIR / f"{name}.json")) for name in presets.available()]
    if not args.markdown:
        for name, data in rows:
            print(f"{name:24} {data.get('description', '')}")
        return 0
    columns = ["card", "model_type", "lora_rank", "base_model_precision", "gradient_checkpointing", "optimizer",
               "resolution", "max_train_steps"]
    print("| preset | " + " | ".join(columns) + " | what it is |")
    print("|---" * (len(columns) + 2) + "|")
    for name, data in rows:
        if data.get("model_type") != "lora":
            data = {k: v for k, v in data.items() if k != "lora_rank"}  # a rank means nothing without LoRA
        cells = [str(data.get(c, "")) for c in columns]
        print(f"| `{name}` | " + " | ".join(cells) + f" | {data.get('description', '')} |")
    return 0


def cmd_runs(args) -> int:
    from sd3fit import runlist, runs

    print(runlist.table(runs.runs_root(args.runs_dir)))
    return 0


def cmd_options(args) -> int:
    from sd3fit import schema

    for name, key in sorted(schema.SD3FIT_KEYS.items()):
        if args.pattern in name:
            print(f"{name:40} {key.type:5} (sd3fit) {key.help}")
    seen = set()
    for name, spec in sorted(schema.simpletuner_options().items()):
        if args.pattern in name and spec["dest"] not in seen:
            seen.add(spec["dest"])
            choices = f" one of {', '.join(map(str, spec['choices']))}" if spec["choices"] else ""
            print(f"{spec['dest']:40} {spec['type']:5}{choices}")
    return 0


def cmd_bench(args) -> int:
    import shlex
    from pathlib import Path

    from sd3fit.bench import runner

    if args.resume and not args.out:
        raise UserError("--resume needs --out: the folder of the benchmark to continue")
    settings = runner.Settings(
        presets=args.presets or runner.default_presets(), budgets=args.gpu_budget, steps=args.steps,
        warmup_steps=args.warmup_steps, resolution=args.resolution, model=args.model,
        validation=not args.no_validation, keep_weights=args.keep_weights, peak_tflops=args.peak_tflops,
        speed=args.speed, rounds=args.rounds, num_processes=args.num_processes,
    )
    out = Path(args.out or time.strftime("benchmarks/bench-%Y%m%d-%H%M%S"))
    command = "sd3fit " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "sd3fit bench"
    return runner.run(settings, out, resume=args.resume, command=command)


def cmd_bench_layers(args) -> int:
    import shlex
    from pathlib import Path

    from sd3fit.bench import layers

    if args.repeats < 1 or not 0 < args.token_scale <= 1:
        raise UserError("--repeats must be at least 1 and --token-scale between 0 (excluded) and 1")
    out = Path(args.out or time.strftime("benchmarks/layers-%Y%m%d-%H%M%S"))
    command = "sd3fit " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench-layers"] else "sd3fit bench-layers"
    done = layers.run(out, command, args.repeats, args.token_scale, (False,) if args.no_compile else (False, True))
    print((done / "layers.md").read_text(), end="")
    print(f"results: {done / 'layers.json'}")
    return 0


def _is_bench_results(path) -> bool:
    if path.is_file():
        return path.suffix == ".jsonl" and path.name != "metrics.jsonl"
    return (path / "results.jsonl").is_file()


def cmd_report(args) -> int:
    from pathlib import Path

    from sd3fit.report import summary, write
    from sd3fit.runs import require_free_folder

    out = Path(args.out or time.strftime("reports/report-%Y%m%d-%H%M%S"))
    require_free_folder(out, "--out")
    paths = [Path(a) for a in args.runs]
    if any(_is_bench_results(p) for p in paths):
        from sd3fit.bench import results
        from sd3fit.report import bench

        if not all(_is_bench_results(p) for p in paths):
            raise UserError("give either run folders or benchmark results to one report, not both")
        found = [row for p in paths for row in results.read(p)]
        if not found:
            raise UserError(f"{args.runs[0]} holds no benchmark rows yet")
        for path in bench.write(found, out):
            print(path)
        return 0
    runs = []
    for arg in args.runs:
        found = summary.summarize(Path(arg))
        if found.steps == 0:
            raise UserError(f"{arg} logged no training step; nothing to report")
        runs.append(found)
    for path in write.write(runs, out):
        print(path)
    return 0


def cmd_digest(args) -> int:
    from pathlib import Path

    from sd3fit.measure import digest, profiler, trace

    if args.top < 1:
        raise UserError(f"--top must be 1 or more, not {args.top}")
    path = Path(args.path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a .pt.trace.json file or a run folder")
    found = [path] if path.is_file() else profiler.traces(path)
    if not found:
        raise UserError(f"no profiler traces under {path}; train with enable_profiler=true")
    for n, trace_path in enumerate(found):
        if n:
            print()
        loaded = trace.load(trace_path)
        print(digest.render(digest.summarize(loaded, top=args.top), source=str(trace_path)))
        for problem in trace.structure_problems(loaded):
            print(f"  range problem: {problem}")
    return 0


def cmd_infer(args) -> int:
    from sd3fit.infer import cli as infer_cli

    return infer_cli.run(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        args.config = None
    handlers = {"train": cmd_train, "demo": cmd_train, "runs": cmd_runs, "presets": cmd_presets, "options": cmd_options,
                "bench": cmd_bench, "bench-layers": cmd_bench_layers, "report": cmd_report, "digest": cmd_digest,
                "infer": cmd_infer}
    handler = handlers[args.command]
    try:
        return handler(args)
    except UserError as exc:
        print(f"sd3fit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sd3fit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
