"""The `sd3fit` command: `train`, `demo`, `presets`, `options`, `report`, `digest`, `infer`.

Bad input ends with one line on stderr, `sd3fit: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sd3fit.errors import UserError


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a preset option, e.g. max_train_steps=200")
    p.add_argument("--name", help="run folder name under the runs folder (default: <preset>-<date>-<time>)")
    p.add_argument("--runs-dir", help="folder that holds the run folders (default: $SD3FIT_RUNS_DIR or ./runs)")
    p.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) for `accelerate launch`; 1 runs directly")
    p.add_argument("--dry-run", action="store_true", help="check the preset, model and dataset, print the config, train nothing")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd3fit", description="Fine-tune Stable Diffusion 3 Medium with SimpleTuner on one small GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a preset: sd3fit train [CONFIG] [key=value ...]")
    p.add_argument("config", nargs="?", help="preset JSON file or name in config/ (default: the offline demo)")
    _train_args(p)

    p = sub.add_parser("demo", help="train the tiny offline demo (config/demo.json)")
    _train_args(p)

    p = sub.add_parser("presets", help="list the presets in config/")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table of the presets' main options")

    p = sub.add_parser("options", help="list the option names a preset may use")
    p.add_argument("pattern", nargs="?", default="", help="show only options containing this text")

    p = sub.add_parser("report", help="summary table (Markdown, CSV) and figures from run folders' metrics")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with metrics.jsonl)")
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
    from sd3fit import train

    started = time.time()
    config, overrides = _split_config(args)
    prepared = train.prepare(config, overrides, name=args.name, runs_dir=args.runs_dir)
    if args.dry_run:
        print(json.dumps(prepared.record, indent=2))
        print(f"dry run: preset, model and dataset are fine; a run would go to {train.shown(prepared.run.dir)}")
        return 0
    run = train.write(prepared)
    print(f"sd3fit: training {prepared.preset.path.name} in {train.shown(run.dir)}", flush=True)
    code = train.launch(prepared, num_processes=args.num_processes)
    print(train.summary(run, time.time() - started))
    if code != 0:
        result = run.read_result() or {}
        # the first line only: SimpleTuner's messages run to many lines, and the log keeps all of them
        reason = (result.get("error") or f"the trainer exited with status {code}").splitlines()[0]
        print(f"sd3fit: error: training failed: {reason}; full log: {train.shown(run.log)}", file=sys.stderr)
        return code
    return 0


def cmd_presets(args) -> int:
    from sd3fit import presets

    rows = [(name, presets.read(presets.CONFIG_DIR / f"{name}.json")) for name in presets.available()]
    if not args.markdown:
        for name, data in rows:
            print(f"{name:24} {data.get('description', '')}")
        return 0
    columns = ["model_type", "lora_rank", "base_model_precision", "mixed_precision", "optimizer", "resolution", "train_batch_size", "max_train_steps"]
    print("| preset | " + " | ".join(columns) + " | what it is |")
    print("|---" * (len(columns) + 2) + "|")
    for name, data in rows:
        if data.get("model_type") != "lora":
            data = {k: v for k, v in data.items() if k != "lora_rank"}  # a rank means nothing without LoRA
        cells = [str(data.get(c, "")) for c in columns]
        print(f"| `{name}` | " + " | ".join(cells) + f" | {data.get('description', '')} |")
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


def cmd_report(args) -> int:
    from pathlib import Path

    from sd3fit.report import summary, write
    from sd3fit.runs import require_free_folder

    out = Path(args.out or time.strftime("reports/report-%Y%m%d-%H%M%S"))
    require_free_folder(out, "--out")
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
    handlers = {"train": cmd_train, "demo": cmd_train, "presets": cmd_presets, "options": cmd_options,
                "report": cmd_report, "digest": cmd_digest, "infer": cmd_infer}
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
