/**
 * Element types of safetensors checkpoints: sizes, and exact decoding to float32 (the CPU
 * backend's working type). Safetensors bytes are little-endian whatever the host.
 */
import { MoeflashError } from '../errors.js';
import type { DType } from './tensor.js';

/** Bytes per element. */
export const DTYPE_SIZES: Readonly<Record<DType, number>> = {
  BF16: 2,
  F16: 2,
  F32: 4,
  F64: 8,
  F8_E4M3: 1,
  F8_E5M2: 1,
  U8: 1,
  I8: 1,
  I16: 2,
  I32: 4,
  I64: 8,
  BOOL: 1,
};

export const DTYPES = Object.keys(DTYPE_SIZES) as DType[];

export function isDType(s: unknown): s is DType {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(DTYPE_SIZES, s);
}

export function dtypeSize(d: DType): number {
  const size = DTYPE_SIZES[d];
  if (size === undefined) {
    throw new MoeflashError('INVALID_ARGUMENT', `unknown dtype '${String(d)}' (known: ${DTYPES.join(', ')})`);
  }
  return size;
}

/** A shape is an array of non-negative integers (`[]` is a scalar). */
export function isShape(v: unknown): v is number[] {
  return Array.isArray(v) && v.every((d) => Number.isSafeInteger(d) && d >= 0);
}

/** Bytes of a tensor; NaN when the count does not fit a safe integer. */
export function tensorByteLength(dtype: DType, shape: readonly number[]): number {
  const n = shape.reduce((a, d) => a * d, dtypeSize(dtype));
  return Number.isSafeInteger(n) ? n : NaN;
}

export const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** A copy of `bytes` with each `size`-byte element reversed (little- <-> big-endian). */
export function byteSwap(bytes: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i += size) {
    for (let j = 0; j < size; j++) out[i + j] = bytes[i + size - 1 - j];
  }
  return out;
}

// e4m3fn: no infinities, so the all-ones exponent still holds finite values up to 448; only
// S.1111.111 is NaN.
function e4m3(code: number): number {
  const sign = code & 0x80 ? -1 : 1;
  const e = (code >> 3) & 0xf;
  const m = code & 7;
  if (e === 15 && m === 7) return NaN;
  if (e === 0) return sign * m * 2 ** -9;
  return sign * (1 + m / 8) * 2 ** (e - 7);
}

function e5m2(code: number): number {
  const sign = code & 0x80 ? -1 : 1;
  const e = (code >> 2) & 0x1f;
  const m = code & 3;
  if (e === 31) return m === 0 ? sign * Infinity : NaN;
  if (e === 0) return sign * m * 2 ** -16;
  return sign * (1 + m / 4) * 2 ** (e - 15);
}

function half(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 31) return m === 0 ? sign * Infinity : NaN;
  if (e === 0) return sign * m * 2 ** -24;
  return sign * (1 + m / 1024) * 2 ** (e - 15);
}

function table(size: number, f: (code: number) => number): Float32Array {
  const t = new Float32Array(size);
  for (let i = 0; i < size; i++) t[i] = f(i);
  return t;
}

export const F8_E4M3_TABLE = table(256, e4m3);
export const F8_E5M2_TABLE = table(256, e5m2);
// Built on first F16 use: 256 KiB that most models (bf16 / fp8) never need. On Node 20 a lookup
// measured 2-3x faster than assembling float32 bits per element; for BF16 the shift wins.
let f16Table: Float32Array | undefined;

/** One IEEE half-precision value (exact; subnormals, +-Inf, NaN). */
export function f16ToFloat32(h: number): number {
  return half(h & 0xffff);
}

// 2^63 and beyond lose bits in Number(); rounding them to odd at 53 bits first keeps the later
// rounding to float32 correct (a plain double would round twice).
function int64ToFloat32(v: bigint): number {
  const neg = v < 0n;
  const a = neg ? -v : v;
  if (a < 2n ** 53n) return Number(v);
  const shift = BigInt(a.toString(2).length - 53);
  let m = a >> shift;
  if (m << shift !== a) m |= 1n;
  const r = Number(m) * 2 ** Number(shift);
  return neg ? -r : r;
}

/**
 * Decodes little-endian elements of `dtype` to float32, exactly where float32 can hold the value
 * (F64 and large I32/I64 round to nearest even). Accepts views at any byte offset.
 */
export function decodeToFloat32(bytes: Uint8Array, dtype: DType): Float32Array {
  const size = dtypeSize(dtype);
  if (bytes.byteLength % size !== 0) {
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `decodeToFloat32: ${bytes.byteLength} bytes is not a whole number of ${dtype} elements (${size} bytes each)`,
    );
  }
  const n = bytes.byteLength / size;
  const out = new Float32Array(n);
  if (size === 1) {
    if (dtype === 'F8_E4M3' || dtype === 'F8_E5M2') {
      const t = dtype === 'F8_E4M3' ? F8_E4M3_TABLE : F8_E5M2_TABLE;
      for (let i = 0; i < n; i++) out[i] = t[bytes[i]];
    } else if (dtype === 'I8') {
      out.set(new Int8Array(bytes.buffer, bytes.byteOffset, n));
    } else if (dtype === 'BOOL') {
      for (let i = 0; i < n; i++) out[i] = bytes[i] === 0 ? 0 : 1;
    } else {
      out.set(bytes);
    }
    return out;
  }
  // Typed-array views need an element-aligned offset and host byte order; copy otherwise.
  let b = bytes;
  if (!HOST_IS_LITTLE_ENDIAN) b = byteSwap(bytes, size);
  else if (b.byteOffset % size !== 0) b = b.slice();
  const buf = b.buffer;
  const off = b.byteOffset;
  switch (dtype) {
    case 'BF16': {
      const src = new Uint16Array(buf, off, n);
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < n; i++) bits[i] = src[i] << 16;
      break;
    }
    case 'F16': {
      const t = (f16Table ??= table(65536, half));
      const src = new Uint16Array(buf, off, n);
      for (let i = 0; i < n; i++) out[i] = t[src[i]];
      break;
    }
    case 'F32':
      out.set(new Float32Array(buf, off, n));
      break;
    case 'F64':
      out.set(new Float64Array(buf, off, n));
      break;
    case 'I16':
      out.set(new Int16Array(buf, off, n));
      break;
    case 'I32':
      out.set(new Int32Array(buf, off, n));
      break;
    case 'I64': {
      const src = new BigInt64Array(buf, off, n);
      for (let i = 0; i < n; i++) out[i] = int64ToFloat32(src[i]);
      break;
    }
    default:
      throw new MoeflashError('INVALID_ARGUMENT', `decodeToFloat32: unhandled dtype ${dtype}`);
  }
  return out;
}
