#!/bin/bash
# The GPU runs this tree still needs, in one call (about 8 minutes on an H100), from the repository
# root with .gpuhost carried (shared/gpu-host/pack.sh with the built dist folders and addon):
#   - every CUDA test, the device DFlash ones (dflash-device.gpu.test.ts) and faults included;
#   - the bundled pair's device rounds on held-out prompts (acceptance earned), at both precisions;
#   - device rounds at the gpt-oss-20b shape with set acceptance (scripts/gpu-dflash.sh);
#   - HF logits of the deepseek_v3 golden fixtures (tools/golden/make_fixtures.py), packed to bring back;
#   - the packed-install check with a GPU visible (tools/pack-check.sh).
# Everything lands in $OUT/results.tgz (plus the fixtures tarball).
set -u
O=${OUT:-/tmp/moeflash-out}
mkdir -p "$O"
source .gpuhost/enter.sh > /dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$O/device.txt"
# The fault test breaks CUDA for its whole process (a sticky error): its own run, after the rest.
timeout 240 npx vitest run packages/cuda-backend --exclude '**/faults.gpu.test.ts' 2>&1 | tee "$O/tests.log" | grep -E "×|FAIL|Test Files|Tests |dflash device" | tail -25
timeout 60 npx vitest run packages/cuda-backend/test/faults.gpu.test.ts 2>&1 | tee "$O/faults.log" | grep -E "×|✓|FAIL|Tests " | tail -8
for p in f32 bf16; do
  MOEFLASH_CUDA_PRECISION=$p timeout 90 node tools/bench/spec-acceptance.mjs --backend cuda --draft models/moeflash-tiny-coder-dflash \
    --blocks 1,2,4,8,16 --temps 0 --max-tokens 96 --out "$O/cuda-dflash-device-$p" 2>&1 | tail -8
done
TAUS="6.3 4" BLOCKS=8,16 BATCH=1,8 GEN=64 BENCH_S=120 timeout 300 bash packages/cuda-backend/scripts/gpu-dflash.sh
PYTHONUNBUFFERED=1 timeout 90 python3 tools/golden/make_fixtures.py --only deepseek_v3_fp8,deepseek_v3_bf16 > "$O/ds-fixtures.log" 2>&1
tail -3 "$O/ds-fixtures.log"
tar czf "$O/golden-deepseek.tgz" -C packages/core/test/fixtures/golden fixtures.json deepseek_v3_fp8 deepseek_v3_bf16 2>/dev/null
timeout 120 bash tools/pack-check.sh --no-build > "$O/pack-check.log" 2>&1; tail -3 "$O/pack-check.log"
(cd "$O" && tar czf results.tgz ./*.json ./*.md ./*.log ./*.txt 2>/dev/null && rm -f ./*.json ./*.md ./*.log ./*.txt)
ls "$O"
