/**
 * Finds NaN and infinite values in stored tensor bytes without decoding them: a float is
 * non-finite exactly when its exponent bits are all ones (E4M3 has no infinities and one NaN code
 * a sign; an MXFP4 scale byte of 255 is E8M0's NaN).
 */
import { HOST_IS_LITTLE_ENDIAN } from './dtypes.js';
import type { DType } from './tensor.js';

export interface NonFiniteCount {
  /** Values that are NaN or infinite. */
  count: number;
  /** Element index of the first one, -1 when none. */
  first: number;
}

/** Per element: its size in bytes, and whether its little-endian bits at `i` are non-finite. */
type Test = (v: DataView, i: number) => boolean;

const TESTS: Partial<Record<DType, [size: number, test: Test]>> = {
  BF16: [2, (v, i) => (v.getUint16(i, true) & 0x7f80) === 0x7f80],
  F16: [2, (v, i) => (v.getUint16(i, true) & 0x7c00) === 0x7c00],
  F32: [4, (v, i) => (v.getUint32(i, true) & 0x7f800000) === 0x7f800000],
  F64: [8, (v, i) => (v.getUint32(i + 4, true) & 0x7ff00000) === 0x7ff00000],
  F8_E4M3: [1, (v, i) => (v.getUint8(i) & 0x7f) === 0x7f],
  F8_E5M2: [1, (v, i) => (v.getUint8(i) & 0x7c) === 0x7c],
};

/** E8M0, the MXFP4 block scale: 2^(byte - 127), with 255 reserved for NaN. */
const MXFP4_SCALE: [number, Test] = [1, (v, i) => v.getUint8(i) === 0xff];

/**
 * Counts non-finite values of a tensor's bytes. `mxfp4Scales` reads U8 bytes as MXFP4 block
 * scales; other U8 data (MXFP4 codes are all finite) and integer types are never non-finite.
 */
export function countNonFinite(bytes: Uint8Array, dtype: DType, mxfp4Scales = false): NonFiniteCount {
  const spec = mxfp4Scales && dtype === 'U8' ? MXFP4_SCALE : TESTS[dtype];
  if (spec === undefined) return { count: 0, first: -1 };
  const [size, test] = spec;
  const fast = typedCount(bytes, dtype);
  if (fast) return fast;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let count = 0;
  let first = -1;
  for (let i = 0, k = 0; i + size <= bytes.length; i += size, k++) {
    if (test(view, i)) {
      if (first < 0) first = k;
      count++;
    }
  }
  return { count, first };
}

/** The common 16- and 32-bit cases through a typed view (several times faster than a DataView). */
function typedCount(bytes: Uint8Array, dtype: DType): NonFiniteCount | null {
  const masks: Partial<Record<DType, number>> = { BF16: 0x7f80, F16: 0x7c00, F32: 0x7f800000 };
  const mask = masks[dtype];
  const size = dtype === 'F32' ? 4 : 2;
  if (mask === undefined || !HOST_IS_LITTLE_ENDIAN || bytes.byteOffset % size !== 0) return null;
  const n = Math.floor(bytes.byteLength / size);
  const words = size === 4 ? new Uint32Array(bytes.buffer, bytes.byteOffset, n) : new Uint16Array(bytes.buffer, bytes.byteOffset, n);
  let count = 0;
  let first = -1;
  for (let k = 0; k < n; k++) {
    if (((words[k] & mask) >>> 0) === mask) {
      if (first < 0) first = k;
      count++;
    }
  }
  return { count, first };
}
