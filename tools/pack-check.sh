#!/usr/bin/env bash
# The packed install, as an application gets it: build the CUDA addon into the platform package,
# `pnpm pack` @moeflash/core, @moeflash/cuda-backend and @moeflash/cuda-backend-linux-x64, install
# the tarballs with npm into an empty folder outside the repository with nvcc off the PATH, and
# check that
#   1. the install compiles nothing (the prebuilt addon matches) and the CUDA backend loads that
#      prebuilt addon; without a GPU it says why ("no NVIDIA driver found ..."), and
#      createEngine({ backend: 'auto' }) falls back to the CPU and generates; with a GPU it
#      generates on the GPU;
#   2. without the platform package (--omit=optional) and without compiling
#      (MOEFLASH_CUDA_BUILD=never), the CUDA backend says it is not installed and 'auto' still
#      generates on the CPU.
#
#   bash tools/pack-check.sh [--no-build]     (--no-build: the packages' dist/ is already built)
#
# Needs nvcc once, to build the addon for the platform package (stale kernels only); the install
# needs none. Registry access for the third-party dependencies (npm's cache serves them offline).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PNPM="npx --yes pnpm@9.15.9"
say() { echo "[pack-check] $*"; }
t0=$(date +%s)

if [ "${1:-}" != "--no-build" ]; then
  $PNPM --filter @moeflash/core --filter @moeflash/cuda-backend build >/dev/null
fi
$PNPM --filter @moeflash/cuda-backend build:prebuilt 2>&1 | grep '^moeflash:'

WORK=$(mktemp -d /tmp/moeflash-pack-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/tarballs"
for p in core cuda-backend cuda-backend-linux-x64; do
  (cd "packages/$p" && $PNPM pack --pack-destination "$WORK/tarballs" >/dev/null)
done
say "packed: $(cd "$WORK/tarballs" && for f in *.tgz; do printf '%s (%s KB) ' "$f" $(($(stat -c %s "$f") / 1024)); done)"

# nvcc off the PATH: drop every folder that holds one, keep node and npm through links.
mkdir -p "$WORK/bin"
for t in node npm; do ln -s "$(command -v $t)" "$WORK/bin/$t"; done
CLEAN_PATH="$WORK/bin:$(echo "$PATH" | tr ':' '\n' | while read -r d; do [ -n "$d" ] && [ ! -e "$d/nvcc" ] && echo "$d"; done | paste -sd:)"
if PATH="$CLEAN_PATH" command -v nvcc >/dev/null; then echo "[pack-check] nvcc still on the PATH" >&2; exit 1; fi

cat >"$WORK/check.mjs" <<'EOF'
// Run from the application folder: everything resolves from its node_modules.
import assert from 'node:assert/strict';
import { createEngine } from '@moeflash/core';
import * as cuda from '@moeflash/cuda-backend';

const [model, expect] = process.argv.slice(2); // expect: 'prebuilt' | 'none'
const say = (line) => console.log(`[pack-check] ${line}`);
const r = cuda.tryLoadAddon();
if (expect === 'prebuilt') {
  assert.ok(!('error' in r), `the CUDA addon should load: ${r.error}`);
  assert.equal(r.from, 'prebuilt');
  assert.match(r.path, /node_modules\/@moeflash\/cuda-backend-linux-x64\/moeflash_cuda\.node$/);
  say(`CUDA addon loaded: ${r.from}, ${r.path.slice(r.path.indexOf('node_modules'))}, ABI ${r.addon.abiVersion}`);
} else {
  assert.ok('error' in r, 'no addon should be installed');
  assert.match(r.error, /not installed/);
  say(`CUDA addon: ${r.error}`);
}
const avail = cuda.isCudaAvailable();
if (avail.ok) say(`GPU: ${avail.devices.map((d) => `${d.name} (sm ${d.computeCapability})`).join(', ')}`);
else say(`${expect === "prebuilt" ? "no GPU" : "CUDA unavailable"}: ${avail.reason}`);

const lines = [];
const engine = await createEngine({ model, backend: 'auto', log: (l) => (lines.push(l), console.log(`[pack-check] log: ${l}`)) });
assert.equal(engine.backend.name, avail.ok ? 'cuda' : 'cpu');
if (!avail.ok) assert.ok(lines.some((l) => /using the CPU backend \(CUDA unavailable/.test(l)), 'auto should say why it fell back');
const stream = engine.generate('def fibonacci(n):', { maxTokens: 24, temperature: 0 });
let text = '';
for await (const c of stream) text += c.text;
const res = await stream.result;
await engine.close();
assert.ok(res.tokens.length > 0 && text.length > 0, 'the engine should generate');
say(`backend '${engine.backend.name}' generated ${res.tokens.length} tokens (${res.tokensPerSecond.toFixed(0)} tokens/s): ${JSON.stringify('def fibonacci(n):' + text)}`);
EOF

install() { # folder, npm arguments...
  local app=$1; shift
  mkdir -p "$app" && cp "$WORK/check.mjs" "$app/"
  echo '{ "name": "app", "private": true, "type": "module" }' >"$app/package.json"
  local s=$(date +%s)
  (cd "$app" && PATH="$CLEAN_PATH" npm install --no-audit --no-fund --foreground-scripts --loglevel=error "$@" 2>&1 |
    grep -E '^moeflash:|ERR|error' | sed 's/^/[pack-check] install: /' || true)
  say "npm install: $(($(date +%s) - s)) s"
}

say "1. tarballs of core, cuda-backend and the platform package, nvcc off the PATH"
install "$WORK/app" "$WORK"/tarballs/*.tgz
[ -f "$WORK/app/node_modules/@moeflash/cuda-backend-linux-x64/moeflash_cuda.node" ] || { say "the platform package was not installed"; exit 1; }
[ ! -e "$WORK/app/node_modules/@moeflash/cuda-backend/build" ] || { say "the install compiled the addon"; exit 1; }
say "nothing compiled (no node_modules/@moeflash/cuda-backend/build)"
(cd "$WORK/app" && PATH="$CLEAN_PATH" node check.mjs "$REPO/models/moeflash-tiny-coder" prebuilt)

say "2. core and cuda-backend only (--omit=optional), MOEFLASH_CUDA_BUILD=never"
MOEFLASH_CUDA_BUILD=never install "$WORK/app2" --omit=optional "$WORK"/tarballs/moeflash-core-*.tgz "$WORK"/tarballs/moeflash-cuda-backend-0*.tgz
[ ! -e "$WORK/app2/node_modules/@moeflash/cuda-backend-linux-x64" ] || { say "the platform package was installed"; exit 1; }
(cd "$WORK/app2" && PATH="$CLEAN_PATH" node check.mjs "$REPO/models/moeflash-tiny-coder" none)

say "passed in $(($(date +%s) - t0)) s"
