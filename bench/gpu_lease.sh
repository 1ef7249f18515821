#!/usr/bin/env bash
# One lease of a GPU machine, prepared ahead: what bench/README.md's GPU table comes from.
#   bash bench/gpu_lease.sh OUT_DIR [BUDGET_S [gpu_throughput.py options]]
# The machine has PyTorch but not Ray or DeepSpeed: .gpu/site.tar.xz, when present, holds them
# for its Python (bench/gpu_site.sh builds it) and is unpacked onto PYTHONPATH. No run starts
# after BUDGET_S seconds (default 330); results.jsonl, the table and the logs land in OUT_DIR.
set -uo pipefail
out=${1:?usage: gpu_lease.sh OUT_DIR [BUDGET_S]}
budget=${2:-330}
shift $(( $# > 1 ? 2 : 1 ))
mkdir -p "$out"
if [ -f .gpu/site.tar.xz ]; then
  python3 -c "import tarfile; tarfile.open('.gpu/site.tar.xz').extractall('/tmp/site', filter='data')" || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f .gpu/shared-mix.tar.xz ]; then  # (the `mix` workload's tasks)
  mkdir -p /tmp/shared && tar -xJf .gpu/shared-mix.tar.xz -C /tmp/shared || exit 1
  export MUPPET_SHARED=/tmp/shared
fi
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import ray, deepspeed, torch, transformers, pyarrow, pydantic; print('ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__)" || exit 1
work=/tmp/muppet-gpu-bench; rm -rf "$work"
timeout "${BENCH_TIMEOUT_S:-480}" python3 bench/gpu_throughput.py --out "$work" --budget-s "$budget" "$@" 2>&1 | tee "$out/bench.txt"
status=$?
cp "$work/results.jsonl" "$out/" 2>/dev/null
tar -czf "$out/logs.tgz" -C "$work" --exclude='checkpoint_*' --exclude='export' \
  --exclude='tensorboard' --exclude='tokenizer' --exclude='.chunk-cache' . 2>/dev/null
exit $status
