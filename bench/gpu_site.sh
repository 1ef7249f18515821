#!/usr/bin/env bash
# Packs what a lent GPU machine lacks (Ray, DeepSpeed and their missing dependencies, for its
# Python 3.12) into .gpu/site.tar.xz, under the 64 MiB a lease carries: Ray's Java jars, RLlib,
# Serve, its LLM library and the dashboard's web client are left out (none is used here). And
# the real BIG-bench tasks of gpu_throughput.py's `mix` workload into .gpu/shared-mix.tar.xz
# (4 MB), from SHARED (default ../shared).
#   bash bench/gpu_site.sh        # then: device run, carry [".gpu"], bash bench/gpu_lease.sh "$OUT"
set -euo pipefail
work=$(mktemp -d)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$work/wheels" ray==2.60.0 jsonschema==4.26.0 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 pydantic==2.14.4 \
  pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 tensorboardX==2.6.5 \
  hjson==3.1.0
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" deepspeed==0.19.8
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done  # (keeps x bits)
rm -rf "$work"/site/ray/{jars,rllib,serve,llm,dashboard/client/build}
mkdir -p .gpu
tar -cf - -C "$work/site" . | xz -T2 -6 > .gpu/site.tar.xz
rm -rf "$work"
shared=${SHARED:-../shared}
files=$(grep -o 'data/bigbench/[^"]*task.json' jobs/configs/real-all.yaml | sort -u)
# shellcheck disable=SC2086
tar -cf - -C "$shared" $files | xz -T2 -6 > .gpu/shared-mix.tar.xz
ls -l .gpu/site.tar.xz .gpu/shared-mix.tar.xz
