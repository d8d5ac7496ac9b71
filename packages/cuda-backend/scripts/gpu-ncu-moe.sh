#!/bin/bash
# On a GPU host (see gpu-run.sh): why the decode MoE kernels stall. ncu on the row-form kernels at
# one token (bench/moe-mma-bench.mjs), warp stall reasons per issued instruction. Output in $OUT.
set -u
O=${OUT:-/tmp/moeflash-out}
mkdir -p "$O"
source .gpuhost/enter.sh
cd packages/cuda-backend
MOE_TOKENS=1 timeout 240 ncu -k regex:moe_mma_rows --launch-skip 40 --launch-count 2 \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,sm__cycles_elapsed.avg.per_second" \
  node bench/moe-mma-bench.mjs > "$O/ncu-moe-stalls.txt" 2>&1
grep -E "moe_mma_rows|stalled|duration|dram__|inst_executed|per_second" "$O/ncu-moe-stalls.txt" | awk '$NF+0 > 0.2 || /moe_mma|duration|dram|inst|second/' | sed -E 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
