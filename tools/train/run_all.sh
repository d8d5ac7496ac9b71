#!/usr/bin/env bash
# Trains moeflash's tiny test models from scratch on a host with one NVIDIA GPU and no network:
# corpus + tokenizer -> target (Qwen3-MoE) -> DFlash drafter. Python 3 with torch, transformers 5,
# tokenizers, safetensors and numpy must be importable by `python3` (or set PYTHON).
#
#   bash tools/train/run_all.sh [OUT_ROOT]        # OUT_ROOT defaults to ./models
#
# Writes OUT_ROOT/moeflash-tiny-coder/ (target) and OUT_ROOT/moeflash-tiny-coder-dflash/ (drafter),
# each with train_results.json and README.md. Scratch files go to $WORK (default tmp/moeflash-train
# under the repository root, which git ignores).
#
# Environment:
#   TARGET_MINUTES, DRAFT_MINUTES   budgets of the two training stages (default 6 each)
#   TARGET_ARGS, DRAFT_ARGS         extra flags for them, e.g. TARGET_ARGS="--compile"
#   STAGES                          which stages to run, default "test data target quantize draft"
#                                   (quantize needs Node and `pnpm build`); a later
#                                   stage reads what earlier ones left in $WORK and OUT_ROOT, so
#                                   STAGES="test data target" then STAGES="draft" split one run
#                                   into two commands
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out_root=$(mkdir -p "${1:-$repo/models}" && cd "${1:-$repo/models}" && pwd)
work=${WORK:-$repo/tmp/moeflash-train}
python=${PYTHON:-python3}
target_minutes=${TARGET_MINUTES:-6}
draft_minutes=${DRAFT_MINUTES:-6}
stages=" ${STAGES:-test data target quantize draft} "
target_dir=$out_root/moeflash-tiny-coder
draft_dir=$out_root/moeflash-tiny-coder-dflash
mkdir -p "$work"

stamp() { date +%s; }
want() { [[ "$stages" == *" $1 "* ]]; }
t0=$(stamp)
echo "== moeflash tiny models: stages [${stages# }], out $out_root, scratch $work"
"$python" - <<'PY'
import importlib, sys
missing = []
for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy"):
    try:
        m = importlib.import_module(name)
        print(f"   {name} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        missing.append(f"{name} ({exc})")
if missing:
    sys.exit("missing Python packages: " + ", ".join(missing))
import torch
if not torch.cuda.is_available():
    sys.exit("PyTorch sees no CUDA device")
print(f"   GPU {torch.cuda.get_device_name(0)}")
PY

if want test; then
  echo "== [0/3] CPU self-test of the drafter module"
  "$python" "$here/test_dflash_model.py"
fi

if want data; then
  echo "== [1/3] corpus and tokenizer"
  t=$(stamp)
  "$python" "$here/prepare_data.py" --work "$work"
  echo "== [1/3] done in $(( $(stamp) - t )) s"
fi

if want target; then
  echo "== [2/3] target (budget $target_minutes min)"
  t=$(stamp)
  # shellcheck disable=SC2086
  "$python" "$here/train_target.py" --work "$work" --out "$target_dir" --minutes "$target_minutes" ${TARGET_ARGS:-}
  echo "== [2/3] done in $(( $(stamp) - t )) s"
fi

# The shipped target keeps its experts in MXFP4 (moeflash quantize, Node); the drafter then learns
# that exact model through an exact bf16 copy of it that torch can run.
draft_target=$target_dir
if want quantize; then
  echo "== [2b] MXFP4 experts (moeflash quantize)"
  node "$repo/packages/core/dist/cli.js" quantize --in "$target_dir" --out "$work/target-mxfp4" --experts mxfp4 --dense bf16 --force
  node "$repo/packages/core/dist/cli.js" quant-report --ref "$target_dir" --quant "$work/target-mxfp4" --json "$work/quant-report.json" --no-weights | tail -8
  "$python" "$here/dequantize_target.py" "$work/target-mxfp4" "$work/target-for-draft"
  cp "$target_dir/train_results.json" "$work/target-mxfp4/" && cp "$target_dir/train_results.json" "$work/target-for-draft/"
  rm -rf "$target_dir" && mv "$work/target-mxfp4" "$target_dir"
fi
[ -d "$work/target-for-draft" ] && draft_target=$work/target-for-draft

if want draft; then
  echo "== [3/3] DFlash drafter (budget $draft_minutes min)"
  t=$(stamp)
  # shellcheck disable=SC2086
  "$python" "$here/train_draft.py" --work "$work" --target "$draft_target" --out "$draft_dir" --minutes "$draft_minutes" ${DRAFT_ARGS:-}
  echo "== [3/3] done in $(( $(stamp) - t )) s"
fi

echo "== folders"
for d in "$target_dir" "$draft_dir"; do
  if [ -d "$d" ]; then du -b "$d"/* | awk '{printf "   %10d  %s\n", $1, $2}'; fi
done
if [ -d "$target_dir" ] && [ -d "$draft_dir" ]; then
  total=$(du -cb "$target_dir" "$draft_dir" | tail -1 | cut -f1)
  echo "   total $total bytes (limit 25000000)"
  if [ "$total" -gt 25000000 ]; then
    echo "FAILED: the two model folders take $total bytes, over 25 MB" >&2
    exit 1
  fi
fi
echo "== done in $(( $(stamp) - t0 )) s"
