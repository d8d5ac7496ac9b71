/**
 * Slow, obviously-correct references the tests compare the fast encoders against. They share no
 * code with src/: values come from the format definitions and rounding is a brute-force search.
 */

const f = new Float32Array(1);
const u = new Uint32Array(f.buffer);

export function bitsOf(x: number): number {
  f[0] = x;
  return u[0];
}

export function fromBits(bits: number): number {
  u[0] = bits >>> 0;
  return f[0];
}

/** The next float32 above x (x finite, not the largest). */
export function nextUp(x: number): number {
  if (x === 0) return 2 ** -149;
  const b = bitsOf(x);
  return fromBits(x > 0 ? b + 1 : b - 1);
}

/** The next float32 below x. */
export function nextDown(x: number): number {
  return -nextUp(-x);
}

export function isNegative(x: number): boolean {
  return (bitsOf(x) >>> 31) === 1;
}

/** Value of a small float code from its definition (sign, exponent, mantissa fields). */
export function smallFloatValue(
  code: number,
  ebits: number,
  mbits: number,
  bias: number,
): number {
  const s = (code >> (ebits + mbits)) & 1 ? -1 : 1;
  const e = (code >> mbits) & ((1 << ebits) - 1);
  const m = code & ((1 << mbits) - 1);
  const mag = e === 0 ? m * 2 ** (1 - bias - mbits) : (1 + m / 2 ** mbits) * 2 ** (e - bias);
  return s * mag;
}

export interface Grid {
  /** finite codes and their values */
  codes: number[];
  values: number[];
}

export function e4m3Grid(): Grid {
  const codes: number[] = [];
  const values: number[] = [];
  for (let c = 0; c < 256; c++) {
    if ((c & 0x7f) === 0x7f) continue;
    codes.push(c);
    values.push(smallFloatValue(c, 4, 3, 7));
  }
  return { codes, values };
}

export function e5m2Grid(): Grid {
  const codes: number[] = [];
  const values: number[] = [];
  for (let c = 0; c < 256; c++) {
    if ((c & 0x7c) === 0x7c) continue;
    codes.push(c);
    values.push(smallFloatValue(c, 5, 2, 15));
  }
  return { codes, values };
}

export function e2m1Grid(): Grid {
  const codes: number[] = [];
  const values: number[] = [];
  for (let c = 0; c < 16; c++) {
    codes.push(c);
    values.push(smallFloatValue(c, 2, 1, 1));
  }
  return { codes, values };
}

/**
 * The code of the finite grid value nearest to finite x among codes of x's sign (so saturation at
 * the largest magnitude, and -0 for small negatives), ties to the even code (the mantissa's last
 * bit is the code's last bit in these formats). Below the largest magnitude, differences are exact
 * in float64 for every pair that can tie, so plain subtraction decides correctly.
 */
export function nearestCode(x: number, grid: Grid, signBit: number): number {
  const neg = isNegative(x);
  // Beyond the largest magnitude the answer is that magnitude; deciding it by subtraction would
  // lose the distances to float64 rounding for huge x.
  let top = -1;
  for (let k = 0; k < grid.codes.length; k++) {
    if (((grid.codes[k] & signBit) !== 0) !== neg) continue;
    if (top < 0 || Math.abs(grid.values[k]) > Math.abs(grid.values[top])) top = k;
  }
  if (Math.abs(x) >= Math.abs(grid.values[top])) return grid.codes[top];
  let best = -1;
  let bestD = Infinity;
  for (let k = 0; k < grid.codes.length; k++) {
    const c = grid.codes[k];
    if (((c & signBit) !== 0) !== neg) continue;
    const d = Math.abs(x - grid.values[k]);
    if (d < bestD || (d === bestD && (c & 1) === 0)) {
      best = c;
      bestD = d;
    }
  }
  return best;
}

/** floor(log2(x)) for positive finite x by comparison with exact powers of two. */
export function floorLog2Ref(x: number): number {
  let e = 0;
  while (2 ** e > x) e--;
  while (2 ** (e + 1) <= x) e++;
  return e;
}

/**
 * MXFP4 quantization straight from the spec: per block, the scale from the largest magnitude,
 * v / X in float64 (exact, X is a power of two), nearest E2M1 code by search. Returns unpacked
 * element codes and scale codes.
 */
export function mxfp4Ref(
  values: Float32Array,
  rule: 'ocp' | 'no-clip',
): { codes: Uint8Array; scales: Uint8Array } {
  const grid = e2m1Grid();
  const nb = values.length / 32;
  const codes = new Uint8Array(values.length);
  const scales = new Uint8Array(nb);
  for (let b = 0; b < nb; b++) {
    const blk = Array.from(values.subarray(b * 32, b * 32 + 32));
    if (blk.some((v) => !Number.isFinite(v))) {
      scales[b] = 0xff;
      continue;
    }
    const amax = Math.max(...blk.map(Math.abs));
    let e: number;
    if (amax === 0) e = -127;
    else if (rule === 'ocp') e = floorLog2Ref(amax) - 2;
    else {
      e = 200;
      while (amax / 2 ** (e - 1) <= 6) e--;
    }
    e = Math.min(127, Math.max(-127, e));
    scales[b] = e + 127;
    for (let i = 0; i < 32; i++) {
      const v = blk[i];
      // Exact in float64 (X is a power of two, the quotient stays in range) and keeps the sign.
      codes[b * 32 + i] = nearestCode(v / 2 ** e, grid, 8);
    }
  }
  return { codes, scales };
}

export function unpackNibbles(blocks: Uint8Array): Uint8Array {
  const out = new Uint8Array(blocks.length * 2);
  for (let i = 0; i < blocks.length; i++) {
    out[2 * i] = blocks[i] & 15;
    out[2 * i + 1] = blocks[i] >> 4;
  }
  return out;
}

export function hex(n: number, width = 2): string {
  return '0x' + (n >>> 0).toString(16).padStart(width, '0');
}
