#!/bin/bash
# On a GPU host, from the repository root, with .gpuhost carried (see shared/gpu-host/pack.sh):
# the CUDA suites, the parity report and the gpt-oss-20b model benchmark. Results go to $OUT.
#   STEPS="tests parity bench" COMMIT=abc123 bash packages/cuda-backend/scripts/gpu-run.sh
set -u
O=${OUT:-/tmp/moeflash-out}
mkdir -p "$O"
source .gpuhost/enter.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$O/device.txt"
for step in ${STEPS:-tests parity bench}; do
  echo "== $step $(date +%T)"
  case "$step" in
    build) (cd packages/cuda-backend && node node_modules/node-gyp/bin/node-gyp.js rebuild -j 16) > "$O/build.log" 2>&1 || tail -30 "$O/build.log" ;;
    tests) timeout "${TESTS_S:-180}" vitest run packages/cuda-backend 2>&1 | tee "$O/tests.log" | grep -E "✓ |×|FAIL|Test Files|Tests |Error|expected" | tail -60 ;;
    parity) timeout "${PARITY_S:-120}" node packages/cuda-backend/scripts/parity-report.mjs "$O/parity-h100${PRECISION:+-$PRECISION}.md" \
      "${COMMIT:-unknown}" "${PRECISION:-auto}" 2>&1 | tail -12 ;;
    parity-bf16) timeout "${PARITY_S:-120}" node packages/cuda-backend/scripts/parity-report.mjs "$O/parity-h100-bf16.md" \
      "${COMMIT:-unknown}" bf16 2>&1 | tail -12 ;;
    fixtures)
      # Golden fixtures with HF logits (needs transformers): FIXTURES names them; they are also packed to bring back.
      PYTHONUNBUFFERED=1 timeout "${FIXTURES_S:-240}" python3 tools/golden/make_fixtures.py --only "${FIXTURES:?}" > "$O/fixtures.log" 2>&1
      tail -8 "$O/fixtures.log"
      tar -czf "$O/golden-fixtures.tgz" -C packages/core/test/fixtures/golden fixtures.json ${FIXTURES//,/ } ;;
    route-diff)
      # Routing of the CUDA backend against the CPU at both precisions, on the fixtures named by FIXTURES.
      for f in ${FIXTURES//,/ }; do for p in bf16 f32; do
        timeout 120 node packages/core/dist/cli.js route-diff --model "packages/core/test/fixtures/golden/$f" \
          --input "packages/core/test/fixtures/golden/$f/input.json" --experts stored --precision $p 2>&1
      done; done | tee "$O/route-diff.log" | grep -E "^packages|=>|sequence" | head -40 ;;
    synth)
      [ -f /tmp/gpt-oss-20b/config.json ] || timeout "${SYNTH_S:-180}" node packages/core/dist/cli.js synth --preset gpt-oss-20b \
        --out /tmp/gpt-oss-20b ${SYNTH_ARGS:-} > "$O/synth.log" 2>&1
      tail -2 "$O/synth.log" ;;
    profile)
      timeout "${PROFILE_S:-480}" node packages/cuda-backend/bench/step-profile.mjs /tmp/gpt-oss-20b "${BATCH:-1}" "${CONTEXT:-640}" \
        "$O/step-profile-b${BATCH:-1}.json" 2>&1 | grep -v loading | tail -30 ;;
    hf)
      timeout "${HF_S:-200}" python3 tools/bench/hf_eager_bench.py /tmp/gpt-oss-20b "$O/hf-eager-gpt-oss-20b.json" --batch 1,8 \
        --prompt 512 --gen 32 2>&1 | tail -6 ;;
    bench)
      [ -f /tmp/gpt-oss-20b/config.json ] || timeout "${SYNTH_S:-180}" node packages/core/dist/cli.js synth --preset gpt-oss-20b \
        --out /tmp/gpt-oss-20b ${SYNTH_ARGS:-} > "$O/synth.log" 2>&1
      timeout "${BENCH_S:-240}" node packages/core/dist/cli.js bench --model /tmp/gpt-oss-20b --backend cuda --batch "${BATCH:-1,8,32}" \
        --prompt "${PROMPT:-512}" --gen "${GEN:-256}" --out "$O/bench-gpt-oss-20b.json" 2>&1 | grep -v loading | tail -14 ;;
  esac
done
echo "== done $(date +%T)"
