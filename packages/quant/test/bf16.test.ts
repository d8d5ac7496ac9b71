import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MoeflashError } from '@moeflash/core';
import {
  bf16BitsToF32,
  decodeBf16,
  encodeBf16,
  f32ToBf16Bits,
  roundToBf16,
} from '../src/index.js';
import { bitsOf, fromBits, hex } from './reference.js';

const isNaNBits = (b: number) => (b & 0x7fff) > 0x7f80;

/**
 * Nearest bf16 by comparing the two candidates that bracket x (its truncation and the next bf16
 * away from zero) in float64, where their distances to a float32 are exact; ties to the even one.
 */
function refBf16(x: number): number {
  const b = bitsOf(x);
  const lo = b >>> 16;
  if ((b & 0xffff) === 0) return lo;
  const hi = lo + 1; // one step away from zero; 0x7F7F + 1 is Inf, as IEEE overflow
  const vlo = Math.abs(fromBits(lo << 16));
  const vhiBits = (hi & 0x7fff) === 0x7f80 ? Infinity : Math.abs(fromBits(hi << 16));
  const a = Math.abs(x);
  // Past the largest finite bf16, the boundary is the midpoint to 2^128.
  const dhi = vhiBits === Infinity ? 2 ** 128 - a : vhiBits - a;
  const dlo = a - vlo;
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1) === 0 ? lo : hi;
}

describe('bf16', () => {
  it('every bit pattern round-trips; NaNs become the quiet NaN with their sign', () => {
    for (let c = 0; c < 0x10000; c++) {
      const v = bf16BitsToF32(c);
      const back = f32ToBf16Bits(v);
      if (isNaNBits(c)) {
        expect(Number.isNaN(v)).toBe(true);
        expect(isNaNBits(back)).toBe(true);
      } else if (back !== c) {
        throw new Error(`${hex(c, 4)} came back as ${hex(back, 4)}`);
      }
    }
    // Arrays carry NaN bits exactly, so the sign rule is checked there.
    const nans = new Float32Array(new Uint32Array([0x7f800001, 0xff800001, 0x7fffffff, 0xffc00000]).buffer);
    expect(Array.from(encodeBf16(nans), (b) => hex(b, 4))).toEqual(['0x7fc0', '0xffc0', '0x7fc0', '0xffc0']);
  });

  it('every tie rounds to the even pattern (exhaustive over all 2^16 ties) and neighbours go to the nearer side', () => {
    for (let c = 0; c < 0x10000; c++) {
      if ((c & 0x7fff) >= 0x7f80) continue; // Inf and NaN have no tie above them
      const tie = ((c << 16) | 0x8000) >>> 0;
      const even = (c & 1) === 0 ? c : c + 1; // c + 1 past 0x7F7F is Inf: IEEE overflow
      const t = fromBits(tie);
      const got = f32ToBf16Bits(t);
      if (got !== even) throw new Error(`tie ${hex(tie, 8)} -> ${hex(got, 4)}, want ${hex(even, 4)}`);
      expect(f32ToBf16Bits(fromBits(tie - 1))).toBe(c);
      expect(f32ToBf16Bits(fromBits(tie + 1))).toBe(c + 1);
    }
  });

  it('zeros, subnormals, overflow and infinities', () => {
    expect(f32ToBf16Bits(0)).toBe(0);
    expect(f32ToBf16Bits(-0)).toBe(0x8000);
    expect(f32ToBf16Bits(fromBits(0x00008000))).toBe(0); // subnormal tie, even
    expect(f32ToBf16Bits(fromBits(0x00018000))).toBe(2);
    expect(f32ToBf16Bits(fromBits(0x00007fff))).toBe(0);
    expect(f32ToBf16Bits(fromBits(0x007fffff))).toBe(0x0080); // largest subnormal -> min normal
    expect(f32ToBf16Bits(-fromBits(0x00000001))).toBe(0x8000);
    expect(f32ToBf16Bits(fromBits(0x7f7fffff))).toBe(0x7f80); // FLT_MAX rounds to Inf
    expect(f32ToBf16Bits(fromBits(0x7f7f7fff))).toBe(0x7f7f);
    expect(f32ToBf16Bits(Infinity)).toBe(0x7f80);
    expect(f32ToBf16Bits(-Infinity)).toBe(0xff80);
    expect(isNaNBits(f32ToBf16Bits(NaN))).toBe(true);
    expect(f32ToBf16Bits(1)).toBe(0x3f80);
    expect(f32ToBf16Bits(1 + 2 ** -8)).toBe(0x3f80); // tie, even
    expect(f32ToBf16Bits(1 + 3 * 2 ** -8)).toBe(0x3f82); // tie, even upwards
    expect(bf16BitsToF32(0x3f80)).toBe(1);
    expect(bf16BitsToF32(0xff80)).toBe(-Infinity);
    expect(() => bf16BitsToF32(0x10000)).toThrow(MoeflashError);
  });

  it('matches the bracketing-candidates reference on random float32 (large sample)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), (bits) => {
        const x = fromBits(bits);
        if (Number.isNaN(x)) return;
        const got = f32ToBf16Bits(x);
        const want = refBf16(x);
        if (got !== want) throw new Error(`${hex(bits, 8)}: got ${hex(got, 4)} want ${hex(want, 4)}`);
      }),
      { numRuns: 200000 },
    );
    fc.assert(
      fc.property(fc.float({ noNaN: true }), (x) => {
        expect(f32ToBf16Bits(x)).toBe(refBf16(x));
      }),
      { numRuns: 50000 },
    );
  });

  it('array versions agree with the scalar ones; roundToBf16 works in place', () => {
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 0, max: 0xffffffff }), { maxLength: 100 }), (bits) => {
        const values = new Float32Array(Uint32Array.from(bits).buffer);
        const enc = encodeBf16(values);
        const dec = decodeBf16(enc);
        const rounded = roundToBf16(values);
        for (let i = 0; i < values.length; i++) {
          if (Number.isNaN(values[i])) {
            expect(isNaNBits(enc[i])).toBe(true);
            expect(rounded[i]).toBeNaN();
            continue;
          }
          expect(enc[i]).toBe(f32ToBf16Bits(values[i]));
          expect(Object.is(dec[i], bf16BitsToF32(enc[i]))).toBe(true);
          expect(Object.is(rounded[i], dec[i])).toBe(true);
        }
        const copy = Float32Array.from(values);
        expect(roundToBf16(copy, copy)).toBe(copy);
        expect(new Uint32Array(copy.buffer)).toEqual(new Uint32Array(rounded.buffer));
      }),
      { numRuns: 1000 },
    );
    expect(() => encodeBf16(new Float32Array(3), new Uint16Array(2))).toThrow(MoeflashError);
    expect(() => decodeBf16(new Uint16Array(3), new Float32Array(2))).toThrow(MoeflashError);
  });
});
