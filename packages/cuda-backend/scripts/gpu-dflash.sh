#!/bin/bash
# On a GPU host, from the repository root, with .gpuhost carried: DFlash rounds on the device at
# the gpt-oss-20b shape (random weights; a random drafter at z-lab's gpt-oss-20b drafter shape, so
# the acceptance is set by the benchmark), against plain decoding in the same run. Results to $OUT.
#   TAUS="6.3 4" BLOCKS=8,16 BATCH=1,8 bash packages/cuda-backend/scripts/gpu-dflash.sh
set -u
O=${OUT:-/tmp/moeflash-out}
mkdir -p "$O"
source .gpuhost/enter.sh > /dev/null
[ -f /tmp/gpt-oss-20b/config.json ] || timeout 240 node packages/core/dist/cli.js synth --preset gpt-oss-20b --out /tmp/gpt-oss-20b > "$O/synth.log" 2>&1
[ -f /tmp/gpt-oss-20b-dflash/config.json ] || timeout 240 node packages/core/dist/cli.js synth --draft-for /tmp/gpt-oss-20b --out /tmp/gpt-oss-20b-dflash >> "$O/synth.log" 2>&1
tail -2 "$O/synth.log"
for tau in ${TAUS:-6.3 4}; do
  timeout "${BENCH_S:-240}" node packages/core/dist/cli.js bench --speculative dflash --model /tmp/gpt-oss-20b --draft /tmp/gpt-oss-20b-dflash \
    --accept "$tau" --blocks "${BLOCKS:-8,16}" --batch "${BATCH:-1,8}" --prompt "${PROMPT:-512}" --gen "${GEN:-96}" \
    --out "$O/dflash-gpt-oss-20b-tau$tau.json" 2>&1 | grep -v loading | tail -8
done
