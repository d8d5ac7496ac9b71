/**
 * Shared by the GPU tests: seeded random inputs (never zeros), bf16 rounding, error measures and
 * float64 references where core has no module for the operation.
 */
import { dequantizeMxfp4Rows, type ExpertActivation } from '@moeflash/core';

/** mulberry32: small, fast, seeded; enough for test inputs. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Uniform in [-scale, scale], never exactly zero. */
export function randomF32(n: number, r: () => number, scale = 1): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = (2 * r() - 1) * scale;
    if (v === 0) v = scale * 1e-3;
    out[i] = v;
  }
  return out;
}

/** Standard normal times scale (Box-Muller). */
export function randomNormal(n: number, r: () => number, scale = 1): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const u = 1 - r();
    const v = r();
    out[i] = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v) * scale;
  }
  return out;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 -> bf16 bits, round to nearest even (finite inputs). */
export function toBf16Bits(x: number): number {
  f32[0] = x;
  const b = u32[0];
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16BitsToF32(bits: number): number {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0];
}

/** Random bf16 tensor: the bits and their exact float32 values. */
export function randomBf16(n: number, r: () => number, scale = 1): { bits: Uint16Array; values: Float32Array } {
  const bits = new Uint16Array(n);
  const values = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let b = toBf16Bits((2 * r() - 1) * scale);
    if ((b & 0x7fff) === 0) b = toBf16Bits(scale * 1e-2);
    bits[i] = b;
    values[i] = bf16BitsToF32(b);
  }
  return { bits, values };
}

/** ||out - ref|| / ||ref||; Infinity when out has a NaN where ref does not. */
export function relError(out: ArrayLike<number>, ref: ArrayLike<number>): number {
  if (out.length !== ref.length) throw new Error(`length ${out.length} vs reference ${ref.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < ref.length; i++) {
    const o = out[i];
    const e = ref[i];
    if (Number.isNaN(o) !== Number.isNaN(e)) return Infinity;
    if (Number.isNaN(e)) continue;
    num += (o - e) * (o - e);
    den += e * e;
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

/** Index of the first element where two arrays differ (bit-for-bit), or -1. */
export function firstMismatch(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return 0;
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return i;
  return -1;
}

/** Prints one check's outcome as a line of the GPU test log. */
export function logCheck(name: string, value: number | string, limit?: number): void {
  const shown = typeof value === 'number' ? value.toExponential(2) : value;
  const bound = limit === undefined ? '' : ` (limit ${limit.toExponential(0)})`;
  console.log(`[cuda] ${name}: ${shown}${bound}`);
}

/**
 * Random MXFP4 expert weights in gpt-oss layout: every code appears; scale codes in
 * [scaleLo, scaleHi] keep dot products over `cols` near unit size.
 */
export function randomMxfp4(
  experts: number,
  rows: number,
  cols: number,
  r: () => number,
  scaleLo = 118,
  scaleHi = 122,
): { blocks: Uint8Array; scales: Uint8Array } {
  const nb = experts * rows * (cols / 32);
  const blocks = new Uint8Array(nb * 16);
  for (let i = 0; i < blocks.length; i++) blocks[i] = Math.floor(r() * 256);
  const scales = new Uint8Array(nb);
  for (let i = 0; i < nb; i++) scales[i] = scaleLo + Math.floor(r() * (scaleHi - scaleLo + 1));
  return { blocks, scales };
}

/** Rows [row0, row0 + n) of expert e, dequantized to float32 [n, cols]. */
export function expertRows(
  w: { blocks: Uint8Array; scales: Uint8Array },
  rows: number,
  cols: number,
  e: number,
  row0: number,
  n: number,
): Float32Array {
  const perRow = cols / 32;
  const first = (e * rows + row0) * perRow;
  return dequantizeMxfp4Rows(
    w.blocks.subarray(first * 16, (first + n * perRow) * 16),
    w.scales.subarray(first, first + n * perRow),
    n,
    cols,
  );
}

/** `k` distinct expert ids per token, uniformly drawn. */
export function randomRouting(tokens: number, k: number, experts: number, r: () => number): Int32Array {
  const ids = new Int32Array(tokens * k);
  for (let t = 0; t < tokens; t++) {
    const perm = Array.from({ length: experts }, (_, i) => i);
    for (let j = 0; j < k; j++) {
      const p = j + Math.floor(r() * (experts - j));
      [perm[j], perm[p]] = [perm[p], perm[j]];
      ids[t * k + j] = perm[j];
    }
  }
  return ids;
}

/** float64 dot of w[offset .. offset + n) with x[xOffset .. xOffset + n). */
export function dot64(w: ArrayLike<number>, offset: number, x: ArrayLike<number>, xOffset: number, n: number): number {
  let s = 0;
  for (let i = 0; i < n; i++) s += w[offset + i] * x[xOffset + i];
  return s;
}

/** gpt-oss's clamped SwiGLU with its released limit and alpha, and plain SwiGLU. */
export const CLAMPED: ExpertActivation = { kind: 'gpt_oss_clamped_swiglu', limit: 7, alpha: 1.702 };
export const SWIGLU: ExpertActivation = { kind: 'swiglu' };

/** An expert's activation of one gate/up pair, in float64 (the references' arithmetic). */
export function activate(g: number, u: number, act: ExpertActivation): number {
  if (act.kind === 'swiglu') return (g / (1 + Math.exp(-g))) * u;
  const gi = Math.min(g, act.limit);
  const ui = Math.min(Math.max(u, -act.limit), act.limit);
  return (ui + 1) * (gi / (1 + Math.exp(-gi * act.alpha)));
}
