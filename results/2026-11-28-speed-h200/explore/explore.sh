#!/usr/bin/env bash
# speed exploration: profiled short runs of the full-size architecture (random weights)
export PYTHONPATH=/tmp/site:$PWD/src SD3FIT_SD3_MEDIUM_DIR=/tmp/sd3m SD3FIT_CACHE_DIR=/tmp/sd3c PYTHONUNBUFFERED=1
mkdir -p $OUT/x
python3 -c "from sd3fit.bench import runner; print(runner.resolve_model('random', set(), True))" 2>&1 | tail -1
DATA=$(python3 -c "from sd3fit.demo import write_demo_dataset; print(write_demo_dataset(__import__('pathlib').Path('/tmp/sd3c/bench-data-1024'), count=16, size=1024))" 2>/dev/null | tail -1)
echo data $DATA
common="pretrained_model_name_or_path=/tmp/sd3m dataset_dir=$DATA data_backend_config=$PWD/config/datasets/image-folder.json resolution=1024 resolution_type=pixel num_train_epochs=0 checkpointing_steps=1000 report_to=none push_to_hub=false disable_benchmark=true step_metrics=true validation_disable=true enable_profiler=true profiler_schedule_warmup=1 profiler_schedule_active=3"
go() { # name timeout preset steps wait overrides...
  name=$1; t=$2; preset=$3; steps=$4; wait=$5; shift 5
  s=$(date +%s)
  timeout -s INT $t python3 -m sd3fit.cli train $preset $common max_train_steps=$steps profiler_schedule_wait=$wait "$@" --name $name --runs-dir /tmp/xr --skip-fit-check > $OUT/x/$name.out 2>&1
  echo "$name rc=$? $(( $(date +%s)-s ))s"; tail -3 $OUT/x/$name.out
  python3 -m sd3fit.cli digest /tmp/xr/$name > $OUT/x/digest-$name.txt 2>&1
  cp /tmp/xr/$name/metrics.jsonl /tmp/xr/$name/result.json $OUT/x/ 2>/dev/null; mv $OUT/x/metrics.jsonl $OUT/x/$name.metrics.jsonl; mv $OUT/x/result.json $OUT/x/$name.result.json
  cp /tmp/xr/$name/train.log $OUT/x/$name.train.log 2>/dev/null
  python3 - $name <<'PY'
import json,sys,statistics
rows=[json.loads(l) for l in open(f"/tmp/xr/{sys.argv[1]}/metrics.jsonl")]
st=[r.get("step_s") or r.get("sd3fit/step_s") for r in rows]
print(sys.argv[1], "steps", [round(x,3) if x else x for x in st])
PY
}
go lora-gc-compiled 200 lora-r64-bf16 14 8 compile_blocks=true
go full24-compiled 260 full-24gb 12 6 compile_blocks=true
go lora24-compiled 130 lora-24gb 14 8 compile_blocks=true
go lora-gc-stock 90 lora-r64-bf16 8 4
