/**
 * Single-thread throughput of the format encoders, in MB/s of float32 input (decoders: MB/s of
 * float32 output). Not a test: numbers vary by machine; nothing asserts on them.
 *
 * Run from the repository root (bundles the sources, so no build is needed):
 *   ESBUILD=$(ls -d node_modules/.pnpm/esbuild@*\/node_modules/esbuild/bin/esbuild | head -1)
 *   $ESBUILD tools/quant/bench-formats.ts --bundle --platform=node --format=esm \
 *     --alias:@moeflash/core=./packages/core/src/index.ts --outfile=/tmp/bench-formats.mjs
 *   node /tmp/bench-formats.mjs [MiB of input, default 64]
 */

import {
  dequantizeMxfp4,
  encodeBf16,
  encodeFp8,
  quantizeFp8Blocked,
  quantizeMxfp4,
} from '../../packages/quant/src/index.js';

const mib = Number(process.argv[2] ?? 64);
const n = Math.floor((mib * 1024 * 1024) / 4 / 32) * 32;

// Weight-like data: normal samples with a per-row spread of magnitudes, from a fixed seed.
let seed = 0x2545f491;
function rand(): number {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) / 4294967296;
}
const values = new Float32Array(n);
for (let i = 0; i < n; i += 2) {
  const r = Math.sqrt(-2 * Math.log(rand() + 1e-12));
  const t = 2 * Math.PI * rand();
  const rowScale = 0.02 * (1 + ((i >>> 12) % 7));
  values[i] = r * Math.cos(t) * rowScale;
  values[i + 1] = r * Math.sin(t) * rowScale;
}

function time(label: string, bytes: number, fn: () => void, reps = 5): void {
  fn(); // warm the JIT before timing
  let best = Infinity;
  for (let k = 0; k < reps; k++) {
    const t0 = process.hrtime.bigint();
    fn();
    const dt = Number(process.hrtime.bigint() - t0) / 1e9;
    if (dt < best) best = dt;
  }
  console.log(`${label.padEnd(34)} ${(bytes / 1e6 / best).toFixed(0).padStart(6)} MB/s  (best of ${reps})`);
}

const inBytes = n * 4;
console.log(`input: ${n} float32 (${(inBytes / 1e6).toFixed(1)} MB), node ${process.version}`);
const blocks = new Uint8Array(n / 2);
const scales = new Uint8Array(n / 32);
time('quantizeMxfp4 ocp (reused out)', inBytes, () => {
  quantizeMxfp4(values, { blocks, scales });
});
time('quantizeMxfp4 no-clip (reused out)', inBytes, () => {
  quantizeMxfp4(values, { scaleRule: 'no-clip', blocks, scales });
});
time('quantizeMxfp4 ocp (allocating)', inBytes, () => {
  quantizeMxfp4(values);
});
time('dequantizeMxfp4', inBytes, () => {
  dequantizeMxfp4(blocks, scales);
});
const fp8 = new Uint8Array(n);
time('encodeFp8 e4m3', inBytes, () => {
  encodeFp8(values, 'e4m3', { out: fp8 });
});
time('encodeFp8 e5m2', inBytes, () => {
  encodeFp8(values, 'e5m2', { out: fp8 });
});
const cols = 4096;
const rows = Math.floor(n / cols);
const w = values.subarray(0, rows * cols);
time('quantizeFp8Blocked 128x128', rows * cols * 4, () => {
  quantizeFp8Blocked(w, rows, cols);
}, 3);
const b16 = new Uint16Array(n);
time('encodeBf16', inBytes, () => {
  encodeBf16(values, b16);
});
