#!/bin/bash
# On a GPU host (see gpu-run.sh): the MoE layer alone under its layout and warp-count knobs, ncu
# sections of the decode (row form) kernels at one token, and their SASS. Results go to $OUT.
set -u
O=${OUT:-/tmp/moeflash-out}
mkdir -p "$O"
source .gpuhost/enter.sh
cd packages/cuda-backend
for km in ${KMAJORS:-0 1}; do for w in ${WARPS_LIST:-1200 2500 5000}; do
  echo "== KMAJOR=$km WARPS=$w"
  MOEFLASH_MOE_KMAJOR=$km MOEFLASH_MOE_WARPS=$w MOE_TOKENS=${TOKENS:-1,8} node bench/moe-mma-bench.mjs 2>&1 | tail -4
done; done | tee "$O/moe-variants.txt"
for km in ${NCU_KMAJORS:-0 1}; do
  MOEFLASH_MOE_KMAJOR=$km MOE_TOKENS=1 timeout 240 ncu -k regex:moe_mma_rows --launch-skip 40 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section LaunchStats --section MemoryWorkloadAnalysis --section InstructionStats \
    node bench/moe-mma-bench.mjs > "$O/ncu-moe-km$km.txt" 2>&1
  grep -E "moe_mma_rows|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Issue Slots Busy|Registers Per|No Eligible|Executed Instructions  " "$O/ncu-moe-km$km.txt" | head -40
done
cuobjdump -sass build/Release/moeflash_cuda.node > /tmp/all.sass 2>/dev/null
python3 - "$O/moe-rows.sass" <<'PY'
import re, sys
text = open('/tmp/all.sass').read()
parts = re.split(r'(?=\n\s+Function : )', text)
keep = [p for p in parts if 'moe_mma_rows_kernel' in p.split('\n', 2)[1]]
open(sys.argv[1], 'w').write('\n'.join(keep))
for p in keep:
    print(p.split('\n', 2)[1].strip(), len(re.findall(r'/\*[0-9a-f]{4}\*/', p)), 'instructions')
PY
