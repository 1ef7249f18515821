#!/usr/bin/env bash
# The cluster path on one lent GPU machine, in one lease (issue 23):
#   bash bench/gpu_cluster.sh OUT_DIR        # the device tool's `run`, carry [".gpu"]
# 1. A task-count sweep (0 and 2 tasks, scored by the protocol) with scaling.use_gpu unset: the
#    start-up line must say GPU, and every protocol fine-tuning run must have trained on cuda.
# 2. The real path against the bare loop (gpu_throughput.py, large, ZeRO-2, 384 x 1): the step
#    code it now shares with the protocol must keep bench/README.md's ratio (0.916).
set -uo pipefail
out=${1:?usage: gpu_cluster.sh OUT_DIR}
mkdir -p "$out"
python3 -c "import tarfile; tarfile.open('.gpu/site.tar.xz').extractall('/tmp/site', filter='data')" || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
sweep=/tmp/gpu-sweep; rm -rf "$sweep"
settings=(tasks.suite_scale=0.1 training.max_steps=4 training.warmup_steps=1
          training.checkpoint_every=4 training.max_eval_examples=32 model.hidden_size=32
          model.ffn_size=64 model.num_layers=1 scaling.num_workers=1 batching.micro_batch_size=8
          "tasks.include=[sentiment, topic, needs, what_has]" "run.storage_path=$sweep" run.name=sw)
args=()
for setting in "${settings[@]}"; do args+=(--set "$setting"); done
began=$(date +%s)
timeout 300 python3 -m muppet_ray sweep tasks --counts 0,2 --eval-tasks review --seeds 0,1 \
  --max-concurrent 1 "${args[@]}" > "$out/sweep.txt" 2>&1
echo "sweep exit $? in $(( $(date +%s) - began )) s"
grep -h "workers on" "$out/sweep.txt"
python3 - "$sweep/sw/results.json" <<'PY'
import collections, json, sys
rows = json.load(open(sys.argv[1]))
print("protocol runs by device:", dict(collections.Counter(r.get("device") for r in rows)),
      "errors:", [r["error"] for r in rows if "error" in r])
PY
timeout 280 python3 bench/gpu_throughput.py --out /tmp/tp --workloads suite --sizes large --zero 2 \
  --attention padded --micro-batch 384 --accum 1 --steps 30 2>&1 | tail -12 | tee "$out/throughput.txt"
