#!/usr/bin/env node
// Microbenchmark of the decode-critical kernels at gpt-oss-20b shapes: bf16 GEMV (attention
// projections, router, LM head) and the MXFP4 expert kernels (32 experts, top-4), for 1, 2, 4 and
// 8 tokens. Times are device time from CUDA events (warm-up first, median of many, launches
// queued back to back); bandwidth is bytes that must move (weights read once, activations in and
// out) over that time, compared with a device-to-device copy measured in the same run.
//
//   node bench/kernels-bench.mjs <out.json> [--quick]
//
// Needs the built addon and the built packages: `pnpm --filter @moeflash/cuda-backend build:native`
// and `pnpm --filter @moeflash/core --filter @moeflash/cuda-backend build`.
import { writeFileSync } from 'node:fs';

const args = process.argv.slice(2);
const out = args.find((a) => !a.startsWith('--'));
const quick = args.includes('--quick');
if (!out) {
  console.error('usage: node bench/kernels-bench.mjs <out.json> [--quick]');
  process.exit(2);
}

let cuda;
try {
  cuda = await import('../dist/index.js');
} catch (e) {
  console.error(
    `moeflash bench: cannot import ../dist/index.js (${e.message}); build first: ` +
      'pnpm --filter @moeflash/core --filter @moeflash/cuda-backend build',
  );
  process.exit(1);
}
const avail = cuda.isCudaAvailable();
if (!avail.ok) {
  console.error(`moeflash bench: CUDA is not available: ${avail.reason}`);
  process.exit(1);
}
const addon = cuda.loadAddon();
const bench = addon.bench;
const device = avail.devices[0];

const median = (xs) => {
  const s = Array.from(xs).sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const quantile = (xs, q) => {
  const s = Array.from(xs).sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
};
const GB = 1e9;

// gpt-oss-20b
const H = 2880;
const HEADS = 64;
const KV_HEADS = 8;
const HEAD_DIM = 64;
const VOCAB = 201088;
const EXPERTS = 32;
const TOP_K = 4;
const INTER = 2880;
const TOKENS = quick ? [1, 8] : [1, 2, 4, 8];
const ITERS = quick ? 30 : 200;

// Copy bandwidth: bytes read plus bytes written.
const copyBytes = 2 ** 30;
const copyTimes = bench.copy(copyBytes, quick ? 10 : 30);
const copyMs = median(copyTimes);
const copyGBs = (2 * copyBytes) / (copyMs / 1e3) / GB;
console.log(`device: ${device.name} (${device.multiprocessors} SMs, ${(device.totalMemory / 2 ** 30).toFixed(1)} GiB)`);
console.log(`device-to-device copy of ${copyBytes / 2 ** 20} MiB: ${copyMs.toFixed(3)} ms, ${copyGBs.toFixed(0)} GB/s (read + write)\n`);

const gemvShapes = [
  { name: 'q_proj', rows: HEADS * HEAD_DIM, cols: H },
  { name: 'k_proj / v_proj', rows: KV_HEADS * HEAD_DIM, cols: H },
  { name: 'o_proj', rows: H, cols: HEADS * HEAD_DIM },
  { name: 'router', rows: EXPERTS, cols: H },
  { name: 'qkv fused', rows: (HEADS + 2 * KV_HEADS) * HEAD_DIM, cols: H },
  { name: 'lm_head', rows: VOCAB, cols: H },
];

const rows = [];
const pad = (s, n) => String(s).padEnd(n);
const padL = (s, n) => String(s).padStart(n);
console.log(`${pad('kernel', 34)}${padL('T', 3)}${padL('median us', 12)}${padL('p90 us', 10)}${padL('MB', 10)}${padL('GB/s', 9)}${padL('% copy', 8)}`);
const line = (name, t, ms, p90, bytes) => {
  const gbs = bytes / (ms / 1e3) / GB;
  console.log(
    `${pad(name, 34)}${padL(t, 3)}${padL((ms * 1e3).toFixed(1), 12)}${padL((p90 * 1e3).toFixed(1), 10)}${padL((bytes / 1e6).toFixed(1), 10)}${padL(gbs.toFixed(0), 9)}${padL(((100 * gbs) / copyGBs).toFixed(1), 8)}`,
  );
  return gbs;
};

for (const s of gemvShapes) {
  const bytesPerCopy = s.rows * s.cols * 2;
  // Rotate over enough copies that the weights cannot stay in the 50 MB L2.
  const copies = Math.max(1, Math.min(64, Math.ceil((512 * 2 ** 20) / bytesPerCopy)));
  for (const t of TOKENS) {
    const iters = s.name === 'lm_head' ? Math.min(ITERS, 50) : ITERS;
    const r = bench.gemvBf16(s.rows, s.cols, t, iters, copies, 10);
    const ms = median(r.times);
    const gbs = line(`gemv_bf16 ${s.name} ${s.rows}x${s.cols}`, t, ms, quantile(r.times, 0.9), r.bytes);
    rows.push({ kernel: 'gemv_bf16', shape: s.name, rows: s.rows, cols: s.cols, tokens: t, iters, copies, medianMs: ms, p90Ms: quantile(r.times, 0.9), bytes: r.bytes, GBps: gbs, fractionOfCopy: gbs / copyGBs });
  }
}

for (const t of TOKENS) {
  const r = bench.moe(t, TOP_K, EXPERTS, H, INTER, ITERS, 2, 10, 1);
  for (const [name, times, bytes] of [
    ['moe_gate_up_mxfp4 (clamped swiglu)', r.gateUp, r.gateUpBytes],
    ['moe_down_mxfp4 (+ combine)', r.down, r.downBytes],
  ]) {
    const ms = median(times);
    const perIter = Array.from(times, (x, i) => bytes[i] / (x / 1e3) / GB);
    const meanBytes = bytes.reduce((a, b) => a + b, 0) / bytes.length;
    const gbs = median(perIter);
    console.log(
      `${pad(name, 34)}${padL(t, 3)}${padL((ms * 1e3).toFixed(1), 12)}${padL((quantile(times, 0.9) * 1e3).toFixed(1), 10)}${padL((meanBytes / 1e6).toFixed(1), 10)}${padL(gbs.toFixed(0), 9)}${padL(((100 * gbs) / copyGBs).toFixed(1), 8)}`,
    );
    rows.push({ kernel: name.split(' ')[0], experts: EXPERTS, topK: TOP_K, hidden: H, inter: INTER, tokens: t, iters: ITERS, medianMs: ms, p90Ms: quantile(times, 0.9), meanBytes, GBps: gbs, fractionOfCopy: gbs / copyGBs });
  }
}

const result = {
  benchmark: 'moeflash cuda-backend kernels',
  date: new Date().toISOString(),
  device: { name: device.name, computeCapability: device.computeCapability, multiprocessors: device.multiprocessors, totalMemory: device.totalMemory },
  model: 'gpt-oss-20b shapes',
  copy: { bytes: copyBytes, medianMs: copyMs, GBps: copyGBs },
  results: rows,
};
writeFileSync(out, JSON.stringify(result, null, 2));
console.log(`\nwrote ${out}`);
