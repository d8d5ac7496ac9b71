/**
 * MXFP4 test vectors for the QAT fake-quant (tools/qat): float32 inputs and what our encoder makes
 * of them under each scale rule. tools/qat/test_bit_identity.py checks the PyTorch implementation
 * against these files bit for bit; mxfp4-vectors.test.ts checks the committed files still equal
 * what the encoder produces.
 *
 * Files (all little-endian, in packages/quant/test/vectors/):
 * - mxfp4_inputs.bin: float32 [ROWS, COLS] (blocks of 32 along each row)
 * - mxfp4_{ocp,no-clip}_blocks.bin: uint8 [ROWS, COLS/32, 16], packed codes (low nibble first)
 * - mxfp4_{ocp,no-clip}_scales.bin: uint8 [ROWS, COLS/32], E8M0 codes
 * - mxfp4_{ocp,no-clip}_dequant.bin: float32 [ROWS, COLS], the decoded values
 * - mxfp4_vectors.json: shapes, file names and SHA-256 of each file
 */
import { createHash } from 'node:crypto';
import { dequantizeMxfp4, E2M1_VALUES, quantizeMxfp4, type Mxfp4ScaleRule } from '../src/index.js';
import { fromBits, nextDown, nextUp } from './reference.js';

/** 256 values a row: 8 blocks. */
export const COLS = 256;

class Rng {
  constructor(private s: number) {}
  u32(): number {
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (this.s = x >>> 0);
  }
  uniform(): number {
    return (this.u32() + 0.5) / 4294967296;
  }
  normal(): number {
    return Math.sqrt(-2 * Math.log(this.uniform())) * Math.cos(2 * Math.PI * this.uniform());
  }
  int(n: number): number {
    return this.u32() % n;
  }
}

/** Blocks of 32 designed to hit every rule of the encoder, then random ones. */
function inputBlocks(): number[][] {
  const blocks: number[][] = [];
  const rng = new Rng(0x5eed1234);
  const pad = (vals: number[], fill = 0): number[] => {
    const b = vals.slice(0, 32);
    while (b.length < 32) b.push(fill);
    return b;
  };
  const grid = [...E2M1_VALUES];
  const ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5];

  blocks.push(pad([]));
  blocks.push(pad([], -0));
  blocks.push(pad([0, -0, 0, -0]));
  // Every grid value, every tie and its neighbours, at many scales; a 6 pins the block scale to X
  // under both rules (6 = 1.5 * 4: mantissa 1.5 is the largest that does not clip).
  for (const k of [-149, -140, -133, -129, -127, -126, -125, -100, -20, -3, -1, 0, 1, 2, 10, 60, 100, 124, 125]) {
    const x = 2 ** k;
    const around = ties.flatMap((t) => [nextDown(t), t, nextUp(t)]);
    for (const sign of [1, -1]) {
      blocks.push(pad([6, ...grid.slice(0, 15)].map((v) => sign * v * x)));
      blocks.push(pad([6, ...around.slice(0, 21), ...ties.map((t) => -t)].map((v) => Math.fround(sign * v * x))));
    }
  }
  // The clipping case and its edges: block maxima with mantissas just under, at and over 1.5.
  for (const m of [1.5, nextUp(1.5), 1.75, 1.9, 1.99, nextDown(2), 1, nextUp(1)]) {
    for (const k of [-130, -127, -60, 0, 5, 126, 127]) {
      const amax = Math.fround(m * 4 * 2 ** k);
      if (!Number.isFinite(amax)) continue;
      const b = [amax, -amax];
      for (let i = 2; i < 32; i++) b.push(Math.fround(amax * (i / 32) * (i % 2 ? 1 : -1)));
      blocks.push(b);
    }
  }
  // Extremes: the largest float, overflow of the decoded value, subnormal maxima.
  const F32_MAX = fromBits(0x7f7fffff);
  blocks.push(pad([F32_MAX, -F32_MAX, F32_MAX / 2, 1, 2 ** -149]));
  blocks.push(pad([fromBits(0x7f000000), 1.5 * 2 ** 127, 2 ** 127, 3 * 2 ** 126]));
  blocks.push(pad([2 ** -149, -(2 ** -149), 3 * 2 ** -149, 2 ** -130]));
  blocks.push(pad([fromBits(0x007fffff), fromBits(0x00400000), fromBits(0x00400001)]));
  // Non-finite values: the whole block becomes NaN.
  for (const special of [Number.NaN, fromBits(0xffc00000), fromBits(0x7f800001), fromBits(0x7fbfffff), Infinity, -Infinity]) {
    const b = pad([1, 2, 3, 0.1, -7]);
    b[rng.int(32)] = special;
    blocks.push(b);
  }

  // Random float32 bit patterns (every exponent, NaN payloads included).
  while (blocks.length < 640) blocks.push(Array.from({ length: 32 }, () => fromBits(rng.u32())));
  // Weight-like blocks: Gaussian at a random scale, some with one outlier.
  while (blocks.length < 1600) {
    const s = 2 ** (rng.int(240) - 128);
    const b = Array.from({ length: 32 }, () => Math.fround(rng.normal() * s));
    if (rng.int(3) === 0) b[rng.int(32)] = Math.fround(b[0] * (4 + rng.int(60)));
    blocks.push(b);
  }
  // Values on the grid (times a block scale) plus a little noise: many exact ties.
  while (blocks.length < 2048) {
    const e = rng.int(250) - 127;
    const b = Array.from({ length: 32 }, () => {
      const g = grid[rng.int(16)];
      const t = ties[rng.int(7)] * (rng.int(2) ? 1 : -1);
      return Math.fround((rng.int(2) ? g : t) * 2 ** e);
    });
    blocks.push(b);
  }
  return blocks;
}

export interface RuleVectors {
  blocks: Uint8Array;
  scales: Uint8Array;
  dequant: Float32Array;
}

export interface Mxfp4Vectors {
  rows: number;
  cols: number;
  inputs: Float32Array;
  rules: Record<Mxfp4ScaleRule, RuleVectors>;
}

/** The vectors, computed now by our encoder (deterministic). */
export function makeMxfp4Vectors(): Mxfp4Vectors {
  const blocks = inputBlocks();
  const inputs = new Float32Array(blocks.length * 32);
  blocks.forEach((b, i) => inputs.set(b, i * 32));
  const rules = {} as Record<Mxfp4ScaleRule, RuleVectors>;
  for (const rule of ['ocp', 'no-clip'] as const) {
    const q = quantizeMxfp4(inputs, { scaleRule: rule });
    rules[rule] = { blocks: q.blocks, scales: q.scales, dequant: dequantizeMxfp4(q.blocks, q.scales) };
  }
  return { rows: inputs.length / COLS, cols: COLS, inputs, rules };
}

/** File name -> bytes of the vector files, and the manifest that lists them. */
export function vectorFiles(v: Mxfp4Vectors): Map<string, Uint8Array> {
  const files = new Map<string, Uint8Array>();
  const bytes = (a: Float32Array | Uint8Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  files.set('mxfp4_inputs.bin', bytes(v.inputs));
  for (const [rule, r] of Object.entries(v.rules)) {
    files.set(`mxfp4_${rule}_blocks.bin`, r.blocks);
    files.set(`mxfp4_${rule}_scales.bin`, r.scales);
    files.set(`mxfp4_${rule}_dequant.bin`, bytes(r.dequant));
  }
  const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
  const manifest = {
    schema: 'moeflash.mxfp4-vectors.v1',
    description:
      'float32 inputs and @moeflash/quant quantizeMxfp4 / dequantizeMxfp4 outputs for each scale rule; ' +
      'blocks of 32 along each row; packed codes: element 2i in the low nibble of byte i; little-endian',
    rows: v.rows,
    cols: v.cols,
    inputs: { file: 'mxfp4_inputs.bin', dtype: 'float32', shape: [v.rows, v.cols], sha256: sha(files.get('mxfp4_inputs.bin')!) },
    rules: Object.fromEntries(
      Object.keys(v.rules).map((rule) => [
        rule,
        {
          blocks: { file: `mxfp4_${rule}_blocks.bin`, dtype: 'uint8', shape: [v.rows, v.cols / 32, 16], sha256: sha(files.get(`mxfp4_${rule}_blocks.bin`)!) },
          scales: { file: `mxfp4_${rule}_scales.bin`, dtype: 'uint8', shape: [v.rows, v.cols / 32], sha256: sha(files.get(`mxfp4_${rule}_scales.bin`)!) },
          dequant: { file: `mxfp4_${rule}_dequant.bin`, dtype: 'float32', shape: [v.rows, v.cols], sha256: sha(files.get(`mxfp4_${rule}_dequant.bin`)!) },
        },
      ]),
    ),
  };
  files.set('mxfp4_vectors.json', new TextEncoder().encode(JSON.stringify(manifest, null, 2) + '\n'));
  return files;
}
