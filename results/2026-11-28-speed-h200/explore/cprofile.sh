export PYTHONPATH=/tmp/site:$PWD/src SD3FIT_SD3_MEDIUM_DIR=/tmp/sd3m SD3FIT_CACHE_DIR=/tmp/sd3c PYTHONUNBUFFERED=1
mkdir -p $OUT/x
python3 -c "from sd3fit.bench import runner; print(runner.resolve_model('random', set(), True))" 2>&1 | tail -1
DATA=$(python3 -c "from sd3fit.demo import write_demo_dataset; print(write_demo_dataset(__import__('pathlib').Path('/tmp/sd3c/bench-data-1024'), count=16, size=1024))" 2>/dev/null | tail -1)
common="pretrained_model_name_or_path=/tmp/sd3m dataset_dir=$DATA data_backend_config=$PWD/config/datasets/image-folder.json resolution=1024 resolution_type=pixel num_train_epochs=0 checkpointing_steps=1000 report_to=none push_to_hub=false disable_benchmark=true step_metrics=true validation_disable=true max_train_steps=14"
go() { name=$1; t=$2; preset=$3; shift 3
  XPROF=7:12 XPROF_OUT=$OUT/x/prof-$name.txt timeout -s INT $t python3 -m sd3fit.cli train $preset $common "$@" --name $name --runs-dir /tmp/xr --skip-fit-check > /tmp/xr-$name.out 2>&1
  echo "$name rc=$?"; tail -2 /tmp/xr-$name.out
  python3 - $name <<'PY'
import json,sys
for l in open(f"/tmp/xr/{sys.argv[1]}/metrics.jsonl"):
  d=json.loads(l); print(d['step'], {k.split('/')[1]:round(v,3) for k,v in d.items() if k.startswith('time/')})
r=json.load(open(f"/tmp/xr/{sys.argv[1]}/result.json")); print(r.get('speed'), r.get('optimizer'))
PY
}

go fast 170 lora-24gb compile_blocks=true fused_optimizer=true
