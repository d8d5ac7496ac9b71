import { describe, expect, it } from 'vitest';
import { MoeflashError } from '../src/errors.js';
import { decodeToFloat32, dtypeSize, F8_E4M3_TABLE, F8_E5M2_TABLE, f16ToFloat32 } from '../src/weights/dtypes.js';
import type { DType } from '../src/weights/tensor.js';

const u8 = (...codes: number[]) => new Uint8Array(codes);
const u16 = (...codes: number[]) => new Uint8Array(new Uint16Array(codes).buffer);

/** Float32 from its bits: an independent route to the expected values. */
function f32bits(bits: number): number {
  return new Float32Array(new Uint32Array([bits >>> 0]).buffer)[0];
}

describe('dtypeSize', () => {
  it('matches the safetensors element sizes', () => {
    const sizes: Record<DType, number> = {
      BF16: 2, F16: 2, F32: 4, F64: 8, F8_E4M3: 1, F8_E5M2: 1, U8: 1, I8: 1, I16: 2, I32: 4, I64: 8, BOOL: 1,
    };
    for (const [d, n] of Object.entries(sizes)) expect(dtypeSize(d as DType)).toBe(n);
    expect(() => dtypeSize('U16' as DType)).toThrow(MoeflashError);
  });
});

describe('F8_E4M3 (e4m3fn)', () => {
  it('decodes hand-picked codes', () => {
    const cases: [number, number][] = [
      [0x00, 0],
      [0x01, 2 ** -9], // smallest subnormal, 0.001953125
      [0x04, 0.0078125], // 4 * 2^-9
      [0x07, 0.013671875], // largest subnormal, 7 * 2^-9
      [0x08, 0.015625], // smallest normal, 2^-6
      [0x30, 0.5],
      [0x38, 1],
      [0x3c, 1.5],
      [0x40, 2],
      [0x70, 128], // e=14: 2^7
      [0x77, 240], // e=14, m=7: 1.875 * 2^7
      [0x7e, 448], // max: 1.75 * 2^8
      [0xb8, -1],
      [0xfe, -448],
      [0x81, -(2 ** -9)],
    ];
    const got = decodeToFloat32(u8(...cases.map((c) => c[0])), 'F8_E4M3');
    cases.forEach(([, v], i) => expect(got[i]).toBe(v));
  });

  it('has NaN only at S.1111.111, no infinities, and -0', () => {
    const got = decodeToFloat32(u8(0x7f, 0xff, 0x80, 0x78, 0xf8), 'F8_E4M3');
    expect(got[0]).toBeNaN();
    expect(got[1]).toBeNaN();
    expect(Object.is(got[2], -0)).toBe(true);
    expect(got[3]).toBe(256); // all-ones exponent is still finite
    expect(got[4]).toBe(-256);
    const nans = [...F8_E4M3_TABLE].filter(Number.isNaN).length;
    expect(nans).toBe(2);
    expect([...F8_E4M3_TABLE].some((v) => !Number.isFinite(v) && !Number.isNaN(v))).toBe(false);
  });

  it('decodes all 256 codes like the float32 bit layout says', () => {
    const all = decodeToFloat32(Uint8Array.from({ length: 256 }, (_, i) => i), 'F8_E4M3');
    for (let c = 0; c < 256; c++) {
      const s = c >> 7;
      const e = (c >> 3) & 15;
      const m = c & 7;
      let want: number;
      if (e === 15 && m === 7) want = NaN;
      else if (e === 0) want = (s ? -1 : 1) * m / 512;
      else want = f32bits((s << 31) | ((e - 7 + 127) << 23) | (m << 20));
      expect(Object.is(all[c], want) || (Number.isNaN(want) && Number.isNaN(all[c]))).toBe(true);
    }
    // Positive finite codes are strictly increasing.
    for (let c = 1; c < 0x7f; c++) expect(all[c]).toBeGreaterThan(all[c - 1]);
  });
});

describe('F8_E5M2', () => {
  it('decodes hand-picked codes', () => {
    const cases: [number, number][] = [
      [0x00, 0],
      [0x01, 2 ** -16], // smallest subnormal, 1.52587890625e-5
      [0x03, 3 * 2 ** -16], // largest subnormal
      [0x04, 2 ** -14], // smallest normal
      [0x3c, 1],
      [0x3e, 1.5],
      [0x40, 2],
      [0x7b, 57344], // max: 1.75 * 2^15
      [0x7c, Infinity],
      [0xfc, -Infinity],
      [0xfb, -57344],
      [0xbc, -1],
    ];
    const got = decodeToFloat32(u8(...cases.map((c) => c[0])), 'F8_E5M2');
    cases.forEach(([, v], i) => expect(got[i]).toBe(v));
  });

  it('has NaN at exponent 31 with a non-zero mantissa, and -0', () => {
    const got = decodeToFloat32(u8(0x7d, 0x7e, 0x7f, 0xfd, 0xfe, 0xff, 0x80), 'F8_E5M2');
    for (let i = 0; i < 6; i++) expect(got[i]).toBeNaN();
    expect(Object.is(got[6], -0)).toBe(true);
    expect([...F8_E5M2_TABLE].filter(Number.isNaN).length).toBe(6);
  });

  it('decodes all 256 codes as the top byte of a half', () => {
    // E5M2 is F16 with the low 8 mantissa bits dropped.
    for (let c = 0; c < 256; c++) {
      const want = f16ToFloat32(c << 8);
      const got = F8_E5M2_TABLE[c];
      expect(Object.is(got, want) || (Number.isNaN(want) && Number.isNaN(got))).toBe(true);
    }
  });
});

describe('F16', () => {
  it('decodes specials, subnormals and extremes', () => {
    const cases: [number, number][] = [
      [0x0000, 0],
      [0x3c00, 1],
      [0xc000, -2],
      [0x3555, 0.333251953125],
      [0x0001, 5.960464477539063e-8], // 2^-24, smallest subnormal
      [0x03ff, 6.097555160522461e-5], // 1023 * 2^-24, largest subnormal
      [0x0400, 6.103515625e-5], // 2^-14, smallest normal
      [0x7bff, 65504], // max
      [0xfbff, -65504],
      [0x7c00, Infinity],
      [0xfc00, -Infinity],
    ];
    const got = decodeToFloat32(u16(...cases.map((c) => c[0])), 'F16');
    cases.forEach(([, v], i) => expect(got[i]).toBe(v));
    const nan = decodeToFloat32(u16(0x7e00, 0x7c01, 0xfe00, 0x7fff, 0x8000), 'F16');
    for (let i = 0; i < 4; i++) expect(nan[i]).toBeNaN();
    expect(Object.is(nan[4], -0)).toBe(true);
  });

  it('decodes every normal half like the float32 bit layout says', () => {
    const codes = Uint16Array.from({ length: 65536 }, (_, i) => i);
    const all = decodeToFloat32(new Uint8Array(codes.buffer), 'F16');
    const wrong: number[] = [];
    for (let h = 0; h < 65536; h++) {
      const e = (h >> 10) & 31;
      if (e === 0 || e === 31) continue;
      if (all[h] !== f32bits(((h & 0x8000) << 16) | ((e + 112) << 23) | ((h & 0x3ff) << 13))) wrong.push(h);
    }
    expect(wrong).toEqual([]);
  });
});

describe('other dtypes', () => {
  it('BF16 is the top half of a float32', () => {
    const got = decodeToFloat32(u16(0x3f80, 0xc040, 0x7f80, 0xff80, 0x7fc0, 0x8000, 0x0001, 0x7f7f), 'BF16');
    expect([...got.slice(0, 4)]).toEqual([1, -3, Infinity, -Infinity]);
    expect(got[4]).toBeNaN();
    expect(Object.is(got[5], -0)).toBe(true);
    expect(got[6]).toBe(2 ** -133);
    expect(got[7]).toBe(f32bits(0x7f7f0000));
  });

  it('F32 passes through and F64 rounds to nearest float32', () => {
    const f32 = new Float32Array([1.5, -0, 3.4028234663852886e38]);
    expect(decodeToFloat32(new Uint8Array(f32.buffer), 'F32')).toEqual(f32);
    const got = decodeToFloat32(new Uint8Array(new Float64Array([0.1, 1e300, -1e-300, 1 + 2 ** -24 + 2 ** -30]).buffer), 'F64');
    expect(got[0]).toBe(Math.fround(0.1));
    expect(got[1]).toBe(Infinity);
    expect(Object.is(got[2], -0)).toBe(true);
    expect(got[3]).toBe(1 + 2 ** -23);
  });

  it('integer types decode as their values', () => {
    expect([...decodeToFloat32(u8(0, 1, 255), 'U8')]).toEqual([0, 1, 255]);
    expect([...decodeToFloat32(u8(0x80, 0xff, 0x7f), 'I8')]).toEqual([-128, -1, 127]);
    expect([...decodeToFloat32(new Uint8Array(new Int16Array([-32768, 32767, -1]).buffer), 'I16')]).toEqual([-32768, 32767, -1]);
    const i32 = decodeToFloat32(new Uint8Array(new Int32Array([-7, 16777217, 2147483647]).buffer), 'I32');
    expect([...i32]).toEqual([-7, 16777216, 2147483648]);
    const i64 = decodeToFloat32(
      new Uint8Array(new BigInt64Array([-5n, 2n ** 53n + 1n, 2n ** 63n - 1n, -(2n ** 63n), 2n ** 62n + 2n ** 38n + 1n]).buffer),
      'I64',
    );
    // The last value sits just above a float32 midpoint; rounding through a double would go down.
    expect([...i64]).toEqual([-5, 2 ** 53, 2 ** 63, -(2 ** 63), 2 ** 62 + 2 ** 39]);
    expect([...decodeToFloat32(u8(0, 1, 0, 1), 'BOOL')]).toEqual([0, 1, 0, 1]);
  });

  it('accepts views at unaligned offsets', () => {
    const raw = new Uint8Array(1 + 8 * 2);
    const f64 = new Float64Array([2.5, -4]);
    raw.set(new Uint8Array(f64.buffer), 1);
    expect([...decodeToFloat32(raw.subarray(1), 'F64')]).toEqual([2.5, -4]);
    const bf = new Uint8Array(3);
    bf.set(u16(0x4000), 1);
    expect([...decodeToFloat32(bf.subarray(1), 'BF16')]).toEqual([2]);
    const half = new Uint8Array(5);
    half.set(u16(0x3c00, 0xc000), 1);
    expect([...decodeToFloat32(half.subarray(1), 'F16')]).toEqual([1, -2]);
    const i16 = new Uint8Array(3);
    i16.set(new Uint8Array(new Int16Array([-300]).buffer), 1);
    expect([...decodeToFloat32(i16.subarray(1), 'I16')]).toEqual([-300]);
  });

  it('rejects a byte count that is not whole elements', () => {
    expect(() => decodeToFloat32(u8(1, 2, 3), 'F32')).toThrow(/3 bytes.*F32/);
  });
});
