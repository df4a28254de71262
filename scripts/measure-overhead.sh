#!/usr/bin/env bash
# What measuring costs: one preset's step time with measuring off, with step metrics only, and with the profiler
# tracing, on SD3 Medium's full-size architecture with random weights (needs a GPU that fits the preset).
#
#   scripts/measure-overhead.sh OUT_DIR [STEPS] [PRESET] [VARIANTS]
#
# VARIANTS (default "off metrics off metrics profiler") are trained one after another, alternating so that drift
# of the machine does not favour one of them. Each run's config.json, result.json and metrics.jsonl are copied to
# OUT_DIR/<variant>-<n>/; calling the script again with the same OUT_DIR adds runs. OUT_DIR/overhead.txt pools
# every run there; OUT_DIR/report/ is `sd3fit report` of them; OUT_DIR/digest.txt digests the newest trace.
# Run folders go to $SD3FIT_RUNS_DIR (default OUT_DIR/runs); the model to $SD3FIT_SD3_MEDIUM_DIR
# (default ~/.cache/sd3fit/sd3-medium-random). PYTHON=... uses an existing environment instead of the locked one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:?usage: scripts/measure-overhead.sh OUT_DIR [STEPS] [PRESET] [VARIANTS]}")
STEPS=${2:-60}
PRESET=${3:-lora-r64-bf16}
VARIANTS=${4:-off metrics off metrics profiler}
if [ -z "${PYTHON:-}" ]; then ./scripts/setup.sh; PYTHON=.venv/bin/python; fi
MODEL=${SD3FIT_SD3_MEDIUM_DIR:-${SD3FIT_CACHE_DIR:-$HOME/.cache/sd3fit}/sd3-medium-random}
RUNS=${SD3FIT_RUNS_DIR:-$OUT/runs}
DATA=$RUNS/overhead-data
mkdir -p "$OUT"

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  "$PYTHON" -c "import torch, simpletuner, diffusers, transformers; print('torch', torch.__version__, '| simpletuner', simpletuner.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
  echo "model: SD3-Medium architecture, random weights (python -m sd3fit.sd3_medium)"
  echo "preset: $PRESET at 1024 px, batch 1, $STEPS steps, 16 generated images; validation and checkpoints off"
  echo "command: scripts/measure-overhead.sh OUT_DIR $STEPS $PRESET \"$VARIANTS\""
} >> "$OUT/environment.txt"

"$PYTHON" -m sd3fit.sd3_medium "$MODEL" --device cuda
"$PYTHON" -c "import sys; from sd3fit.demo import write_demo_dataset; write_demo_dataset(sys.argv[1], count=16, size=1024)" "$DATA"

common=(pretrained_model_name_or_path="$MODEL" dataset_dir="$DATA" data_backend_config=config/datasets/image-folder.json
        resolution=1024 max_train_steps="$STEPS" validation_disable=true report_to=none checkpointing_steps=100000)
declare -A options=(
  [off]="step_metrics=false"
  [metrics]="step_metrics=true"
  [profiler]="step_metrics=true enable_profiler=true profiler_schedule_wait=20 profiler_schedule_warmup=2 profiler_schedule_active=5 profiler_schedule_repeat=1"
)
for variant in $VARIANTS; do
  [ -n "${options[$variant]:-}" ] || { echo "unknown variant $variant (off, metrics, profiler)"; exit 2; }
  n=1; while [ -e "$OUT/$variant-$n" ]; do n=$((n + 1)); done
  run="$variant-$n-$(date +%Y%m%d-%H%M%S)"
  # shellcheck disable=SC2086  # the variant's options are separate words
  "$PYTHON" -m sd3fit.cli train "$PRESET" "${common[@]}" ${options[$variant]} --name "$run" --runs-dir "$RUNS" > "$OUT/$variant-$n.log" 2>&1 \
    || { echo "$variant-$n: training failed, see $OUT/$variant-$n.log"; tail -5 "$OUT/$variant-$n.log"; exit 1; }
  mkdir -p "$OUT/$variant-$n"
  cp "$RUNS/$run"/{config.json,result.json,metrics.jsonl} "$OUT/$variant-$n/"
  if [ "$variant" = profiler ]; then "$PYTHON" -m sd3fit.cli digest "$RUNS/$run" --top 15 > "$OUT/digest.txt"; fi
  echo "$variant-$n done"
done

rm -rf "$OUT/report"
shopt -s nullglob
"$PYTHON" -m sd3fit.cli report "$OUT"/{off,metrics,profiler}-[0-9]*/ --out "$OUT/report" > /dev/null
"$PYTHON" - "$OUT" > "$OUT/overhead.txt" <<'PY'
import sys
from pathlib import Path
from statistics import mean
from sd3fit.report.summary import summarize

out = Path(sys.argv[1])
runs = {v: [summarize(d) for d in sorted(out.glob(f"{v}-[0-9]*")) if d.is_dir()] for v in ("off", "metrics", "profiler")}
print("median wall time between logged steps, host clock (first step and traced steps left out), per run:")
for variant, found in ((v, f) for v, f in runs.items() if f):
    print(f"  {variant:9}" + "".join(f"  {r.median_interval_s:.4f}" for r in found) + " s")
if not runs["off"]:
    sys.exit("no 'off' run in this folder to compare with; run the script with the off variant")
base = mean(r.median_interval_s for r in runs["off"])
print(f"mean of the runs' medians: measuring off {base:.4f} s")
if runs["metrics"]:
    m = mean(r.median_interval_s for r in runs["metrics"])
    print(f"  step metrics      {m:.4f} s  ({100 * (m / base - 1):+.2f} % against off)")
if runs["profiler"]:
    p = mean(r.median_profiled_interval_s for r in runs["profiler"])
    u = mean(r.median_interval_s for r in runs["profiler"])
    print(f"  profiler tracing  {p:.4f} s  ({100 * (p / base - 1):+.2f} %); untraced steps of those runs {u:.4f} s")
    print(f"sd3fit's step timing (GPU timeline): traced steps {mean(r.median_profiled_step_s for r in runs['profiler']):.4f} s")
if runs["metrics"]:
    print(f"sd3fit's step timing (GPU timeline): metrics runs {mean(r.median_step_s for r in runs['metrics']):.4f} s")
PY
cat "$OUT/overhead.txt"
