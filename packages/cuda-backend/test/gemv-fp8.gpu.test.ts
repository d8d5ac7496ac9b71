/**
 * gemv_fp8 (FP8 E4M3 weights with 2-D block scales, the layout of DeepSeek-V3 / Qwen3 FP8
 * checkpoints) against a float64 reference built from core's E4M3 decode table and its
 * dequantization rule (weights/layouts.ts: value = float32(e4m3 * weight_scale_inv[block])).
 * Needs an NVIDIA GPU and the built addon; where either is missing the GPU suites are skipped and
 * the reason printed. The argument checks need only the built addon.
 *
 * Limits: ||out - ref|| / ||ref|| <= 1e-3 (the kernel scales sums of 16 exact products, so it lands
 * near 1e-6); NaN exactly in the rows whose weights hold a NaN code; exact values where a row has a
 * single nonzero weight (one product, one rounding, as core's dequantization); bit-identical
 * results for a token alone and in a batch.
 */
import { describe, expect, it } from 'vitest';

import { F8_E4M3_TABLE } from '@moeflash/core';

import { cudaOps, isCudaAvailable, tryLoadAddon } from '../src/index.js';
import { firstMismatch, logCheck, randomBf16, randomNormal, relError, rng, toBf16Bits, bf16BitsToF32 } from './helpers.js';

const cuda = isCudaAvailable();
const skip = !cuda.ok;
if (!cuda.ok) console.log(`[cuda] gemv_fp8 GPU tests skipped: ${cuda.reason}`);
const built = !('error' in tryLoadAddon());

const F32_LIMIT = 1e-3;
const ops = () => cudaOps();

/** The 254 codes that are numbers (0x7f and 0xff are e4m3fn's NaNs). */
const FINITE_CODES = Array.from({ length: 256 }, (_, c) => c).filter((c) => !Number.isNaN(F8_E4M3_TABLE[c]));

interface Fp8Matrix {
  w: Uint8Array;
  scales: Float32Array;
  rows: number;
  cols: number;
  blockRows: number;
  blockCols: number;
}

/**
 * Random E4M3 codes (every finite code appears: the first 254 elements run through them) and
 * random non-power-of-two scales around what FP8 checkpoints hold (max |w| / 448 for weights of
 * size ~0.05).
 */
function randomFp8(rows: number, cols: number, r: () => number, blockRows = 128, blockCols = 128): Fp8Matrix {
  const w = new Uint8Array(rows * cols);
  for (let i = 0; i < w.length; i++) w[i] = FINITE_CODES[i < FINITE_CODES.length ? i : Math.floor(r() * FINITE_CODES.length)];
  const scales = new Float32Array(Math.ceil(rows / blockRows) * Math.ceil(cols / blockCols));
  for (let i = 0; i < scales.length; i++) scales[i] = (0.5 + r()) * 2 ** -(9 + Math.floor(r() * 4));
  return { w, scales, rows, cols, blockRows, blockCols };
}

/** Core's dequantized value of w[row, col] (float32, as layouts.ts computes it). */
function dequant(m: Fp8Matrix, row: number, col: number): number {
  const scaleCols = Math.ceil(m.cols / m.blockCols);
  const s = m.scales[Math.floor(row / m.blockRows) * scaleCols + Math.floor(col / m.blockCols)];
  return Math.fround(F8_E4M3_TABLE[m.w[row * m.cols + col]] * s);
}

/** y [tokens, rows] in float64 over core's dequantized weights, rounded to float32 at the end. */
function fp8Ref(m: Fp8Matrix, bias: Float32Array | null, x: Float32Array, tokens: number): Float32Array {
  const { rows, cols } = m;
  const y = new Float32Array(tokens * rows);
  const wRow = new Float64Array(cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) wRow[c] = dequant(m, r, c);
    for (let t = 0; t < tokens; t++) {
      let s = bias ? bias[r] : 0;
      const xo = t * cols;
      for (let c = 0; c < cols; c++) s += wRow[c] * x[xo + c];
      y[t * rows + r] = s;
    }
  }
  return y;
}

function run(m: Fp8Matrix, x: Float32Array, tokens: number, bias?: Uint16Array | null, yStride?: number): Float32Array {
  return ops().gemvFp8({
    w: m.w,
    scales: m.scales,
    blockRows: m.blockRows,
    blockCols: m.blockCols,
    bias,
    x,
    rows: m.rows,
    cols: m.cols,
    tokens,
    yStride,
  });
}

function expectClose(name: string, out: ArrayLike<number>, ref: ArrayLike<number>, limit = F32_LIMIT): void {
  const err = relError(out, ref);
  logCheck(name, err, limit);
  expect(err, name).toBeLessThanOrEqual(limit);
}

function expectSame(name: string, out: ArrayLike<number>, ref: ArrayLike<number>): void {
  const i = firstMismatch(out, ref);
  logCheck(name, i < 0 ? 'identical' : `first difference at ${i}: ${out[i]} vs ${ref[i]}`);
  expect(i, name).toBe(-1);
}

describe.skipIf(skip)('gemv_fp8', () => {
  // [rows, cols, tokens, bias, blockRows, blockCols]
  it.each([
    [2880, 2880, 1, true, 128, 128], // partial edge blocks in both dimensions (2880 = 22.5 x 128)
    [2880, 2880, 8, true, 128, 128],
    [4096, 2048, 3, false, 128, 128],
    [513, 1040, 5, true, 128, 128], // odd rows; cols 8 blocks + 16
    [12288, 2048, 8, false, 128, 128], // 4-row groups
    [12289, 2048, 1, true, 128, 128],
    [1027, 10256, 2, true, 128, 128], // more than one batch of chunks per thread
    [7, 48, 6, false, 128, 128],
    [1, 16, 1, true, 128, 128],
    [300, 768, 4, false, 64, 96], // other block shapes
    [257, 512, 7, true, 1, 16],
    [256, 64, 8, false, 32, 32], // qwen3_moe_fused's q | k | v and o (fp8-dense.gpu.test.ts)
    [64, 128, 4, false, 32, 32],
    [128, 64, 3, false, 96, 32], // its q in 96-row blocks: a partial row block
  ])('rows %i cols %i tokens %i bias %s blocks %ix%i', (rows, cols, tokens, withBias, br, bc) => {
    const r = rng(rows * 7 + cols + tokens);
    const m = randomFp8(rows, cols, r, br, bc);
    const bias = withBias ? randomBf16(rows, r, 0.5) : null;
    const x = randomNormal(tokens * cols, r);
    const y = run(m, x, tokens, bias?.bits);
    expectClose(`gemv_fp8 ${rows}x${cols} T=${tokens} ${br}x${bc}`, y, fp8Ref(m, bias?.values ?? null, x, tokens));
  });

  it('decodes all 256 codes exactly, 0x7f and 0xff as NaN, scaled as core dequantizes', () => {
    // One nonzero weight a row (code 0 is +0): the output is that weight times x, one product and
    // one rounding, so it must equal core's float32 dequantized value bit for bit. The code's
    // column walks through every byte position of the 16-byte loads and several scale blocks.
    const rows = 256;
    const cols = 272;
    const r = rng(256);
    const m = randomFp8(rows, cols, r, 128, 128);
    m.w.fill(0);
    const colOf = (code: number) => (code * 37) % cols;
    for (let code = 0; code < 256; code++) m.w[code * cols + colOf(code)] = code;
    const tokens = 2;
    const x = new Float32Array(tokens * cols);
    x.fill(1, 0, cols);
    x.fill(0.5, cols);
    const y = run(m, x, tokens);
    const ref = new Float32Array(tokens * rows);
    for (let code = 0; code < 256; code++) {
      ref[code] = dequant(m, code, colOf(code));
      ref[rows + code] = Math.fround(0.5 * ref[code]);
    }
    // -0 (code 0x80) sums to +0 on the device; the value is the same.
    const noNegZero = (a: Float32Array) => a.map((v) => (v === 0 ? 0 : v));
    expectSame('gemv_fp8 every E4M3 code', noNegZero(y), noNegZero(ref));
    expect(Number.isNaN(y[0x7f]) && Number.isNaN(y[0xff]) && Number.isNaN(y[rows + 0x7f])).toBe(true);
  });

  it('turns exactly the rows holding a NaN code into NaN', () => {
    const rows = 300;
    const cols = 2880;
    const tokens = 3;
    const r = rng(7);
    const m = randomFp8(rows, cols, r);
    const nanRows = [0, 17, 128, 299];
    for (const row of nanRows) m.w[row * cols + Math.floor(r() * cols)] = row % 2 ? 0xff : 0x7f;
    const x = randomNormal(tokens * cols, r);
    const y = run(m, x, tokens);
    const ref = fp8Ref(m, null, x, tokens);
    for (let t = 0; t < tokens; t++)
      for (let row = 0; row < rows; row++)
        expect(Number.isNaN(y[t * rows + row]), `token ${t} row ${row}`).toBe(nanRows.includes(row));
    // relError skips positions that are NaN in both and fails on any other NaN.
    expectClose('gemv_fp8 with NaN codes (finite rows)', y, ref);
  });

  it.each([
    [12288, 2048], // 4-row groups
    [2880, 2880], // 2-row groups, partial blocks
    [513, 10256], // 1-row groups, several batches of chunks
  ])('gives each token the same bits whatever the batch (rows %i cols %i)', (rows, cols) => {
    const r = rng(rows + cols);
    const m = randomFp8(rows, cols, r);
    const x = randomNormal(8 * cols, r);
    const bias = randomBf16(rows, r, 0.5);
    const all = run(m, x, 8, bias.bits);
    for (const t of [0, 3, 7]) {
      const one = run(m, x.subarray(t * cols, (t + 1) * cols), 1, bias.bits);
      expectSame(`gemv_fp8 ${rows}x${cols} token ${t} alone vs in a batch of 8`, one, all.subarray(t * rows, (t + 1) * rows));
    }
    const five = run(m, x.subarray(2 * cols, 7 * cols), 5, bias.bits);
    expectSame(`gemv_fp8 ${rows}x${cols} tokens 2..6 in a batch of 5 vs of 8`, five, all.subarray(2 * rows, 7 * rows));
  });

  it('writes rows into a wider output (yStride) and leaves the rest alone', () => {
    // The model stacks q | k | v (and gate | up) in one output and, where their scale grids do not
    // stack, runs one launch per matrix at a row offset.
    const rows = 200;
    const cols = 1040;
    const stride = 333;
    const tokens = 3;
    const r = rng(333);
    const m = randomFp8(rows, cols, r);
    const bias = randomBf16(rows, r, 0.5);
    const x = randomNormal(tokens * cols, r);
    const y = run(m, x, tokens, bias.bits, stride);
    expect(y.length).toBe(tokens * stride);
    const ref = fp8Ref(m, bias.values, x, tokens);
    const got = new Float32Array(tokens * rows);
    let untouched = 0;
    for (let t = 0; t < tokens; t++) {
      got.set(y.subarray(t * stride, t * stride + rows), t * rows);
      for (let i = t * stride + rows; i < (t + 1) * stride; i++) if (y[i] === 0) untouched++;
    }
    expectClose('gemv_fp8 with yStride', got, ref);
    expect(untouched).toBe(tokens * (stride - rows));
    const plain = run(m, x, tokens, bias.bits);
    expectSame('gemv_fp8 with yStride vs without', got, plain);
  });

  it('matches gemv_bf16 on weights that bf16 holds exactly', () => {
    // Power-of-two scales keep every dequantized weight a bf16 value (E4M3 has 3 mantissa bits):
    // the two kernels then compute the same products in different groupings.
    const rows = 2880;
    const cols = 2880;
    const tokens = 4;
    const r = rng(11);
    const m = randomFp8(rows, cols, r);
    for (let i = 0; i < m.scales.length; i++) m.scales[i] = 2 ** -(8 + (i % 3));
    const wBf16 = new Uint16Array(rows * cols);
    let inexact = 0;
    for (let row = 0; row < rows; row++)
      for (let c = 0; c < cols; c++) {
        const v = dequant(m, row, c);
        wBf16[row * cols + c] = toBf16Bits(v);
        if (bf16BitsToF32(wBf16[row * cols + c]) !== v) inexact++;
      }
    expect(inexact, 'weights that bf16 does not hold exactly').toBe(0);
    const x = randomNormal(tokens * cols, r);
    const y8 = run(m, x, tokens);
    const y16 = ops().gemvBf16({ w: wBf16, x, rows, cols, tokens });
    expectClose('gemv_fp8 vs gemv_bf16 on the same weights', y8, y16, 1e-5);
  });
});

describe.skipIf(!built)('gemv_fp8 arguments', () => {
  const m = { w: new Uint8Array(2 * 32), scales: new Float32Array(1), x: new Float32Array(32), rows: 2, cols: 32, tokens: 1 };

  it('is an op of the addon', () => {
    expect(Object.keys(cudaOps())).toContain('gemvFp8');
  });

  it('rejects bad shapes with INVALID_ARGUMENT naming the argument', () => {
    expect(() => ops().gemvFp8({ ...m, w: new Uint8Array(10) })).toThrow(/w has 10 elements; expected 64/);
    expect(() => ops().gemvFp8({ ...m, scales: new Float32Array(2) })).toThrow(/scales has 2 elements; expected 1/);
    expect(() => ops().gemvFp8({ ...m, blockRows: 1, scales: new Float32Array(1) })).toThrow(/scales has 1 elements; expected 2/);
    expect(() => ops().gemvFp8({ ...m, w: new Uint8Array(2 * 24), x: new Float32Array(24), cols: 24 })).toThrow(/cols must be a multiple of 16/);
    expect(() => ops().gemvFp8({ ...m, blockCols: 24 })).toThrow(/blockCols must be a multiple of 16/);
    expect(() => ops().gemvFp8({ ...m, bias: new Uint16Array(3) })).toThrow(/bias has 3 elements; expected 2/);
    expect(() => ops().gemvFp8({ ...m, yStride: 1 })).toThrow(/yStride must be an integer in \[2, /);
  });
});
