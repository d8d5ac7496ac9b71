#!/usr/bin/env bash
# GPU-host jobs, run from the repository root after `source .gpuhost/enter.sh` (Node on PATH).
#   bash tools/gpu-host/run.sh JOB [JOB ...]     results under $OUT (default /tmp/moeflash-out)
# Jobs: env golden vectors qat train-target train-draft cuda-build cuda-tests bench
set -uo pipefail
OUT=${OUT:-/tmp/moeflash-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=0
log() { echo "== $(date -u +%H:%M:%S) $*"; }

job_env() {
  nvidia-smi | tee "$OUT/nvidia-smi.txt"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  node --version || true
}

# Regenerate the golden fixtures with this host's transformers and compare with the committed ones.
job_golden() {
  python3 tools/golden/make_fixtures.py /tmp/golden > "$OUT/golden.log" 2>&1 || { tail -30 "$OUT/golden.log"; return 1; }
  tail -12 "$OUT/golden.log"
  python3 - <<'PY' | tee "$OUT/golden-compare.txt"
import glob, os
from safetensors.numpy import load_file
import numpy as np
worst = 0.0
for d in sorted(glob.glob('/tmp/golden/*/')):
    name = os.path.basename(d.rstrip('/'))
    a = load_file(os.path.join(d, 'logits.safetensors'))
    b = load_file(os.path.join('packages/core/test/fixtures/golden', name, 'logits.safetensors'))
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    weights = [f for f in sorted(os.listdir(d)) if f.endswith('.safetensors') and f != 'logits.safetensors']
    committed = os.path.join('packages/core/test/fixtures/golden', name)
    same_w = all(open(os.path.join(d, f), 'rb').read() == open(os.path.join(committed, f), 'rb').read() for f in weights)
    worst = max(worst, diff)
    print(f'{name:24s} max |logits(host) - logits(committed)| = {diff:.3e}  weights identical: {same_w}')
print(f'worst {worst:.3e}')
PY
}

job_vectors() {
  python3 tools/quant/make_torch_vectors.py > "$OUT/vectors.log" 2>&1 || { tail -30 "$OUT/vectors.log"; return 1; }
  tail -5 "$OUT/vectors.log"
  cp packages/quant/test/vectors/torch_fp8.json "$OUT/"
}

job_qat() {
  python3 tools/qat/test_bit_identity.py "$OUT/qat.json" --require-cuda 2>&1 | tail -25
}

job_train_target() {
  STAGES="test data target" TARGET_MINUTES=${TARGET_MINUTES:-4.5} bash tools/train/run_all.sh tmp/models 2>&1 | tee "$OUT/train-target.log" | grep -vE '^\s+step' | tail -60
  tar -cf - tmp/models tmp/moeflash-train | split -b 15M - "$OUT/train.tar.part-"
}

job_train_draft() {
  # The drafter learns the shipped target: its MXFP4 experts dequantized to bf16 (exact) for torch.
  tar -xJf tmp/train-data.tar.xz -C tmp
  python3 tools/train/dequantize_target.py models/moeflash-tiny-coder tmp/models/moeflash-tiny-coder && cp models/moeflash-tiny-coder/train_results.json tmp/models/moeflash-tiny-coder/ || return 1
  STAGES="draft" DRAFT_MINUTES=${DRAFT_MINUTES:-5} bash tools/train/run_all.sh tmp/models 2>&1 | tee "$OUT/train-draft.log" | grep -vE '^\s+step' | tail -60
  tar -cf - tmp/models/moeflash-tiny-coder-dflash | split -b 15M - "$OUT/draft.tar.part-"
}

job_cuda_build() {
  (cd packages/cuda-backend && npx node-gyp rebuild > "$OUT/cuda-build.log" 2>&1) || { tail -30 "$OUT/cuda-build.log"; return 1; }
}

job_cuda_tests() {
  npx vitest run packages/cuda-backend --reporter=verbose > "$OUT/cuda-tests.log" 2>&1
  local rc=$?
  grep -E "✓|×|skipped|Tests|FAIL|Error" "$OUT/cuda-tests.log" | tail -60
  return $rc
}

for job in "$@"; do
  log "job $job"
  "job_${job//-/_}" || { status=1; log "job $job FAILED"; }
done
log "done (status $status)"
exit $status
