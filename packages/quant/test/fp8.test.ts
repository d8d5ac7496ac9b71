import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MoeflashError } from '@moeflash/core';
import {
  E4M3_MAX,
  E5M2_MAX,
  decodeE4M3,
  decodeE5M2,
  decodeFp8,
  dequantizeFp8Blocked,
  encodeE4M3,
  encodeE5M2,
  encodeFp8,
  quantizeFp8Blocked,
} from '../src/index.js';
import {
  e4m3Grid,
  e5m2Grid,
  fromBits,
  hex,
  nearestCode,
  nextDown,
  nextUp,
  smallFloatValue,
  type Grid,
} from './reference.js';

interface Fmt {
  name: 'e4m3' | 'e5m2';
  enc: (x: number, o?: { saturate?: boolean }) => number;
  dec: (c: number) => number;
  grid: Grid;
  max: number;
  maxCode: number;
  isNaNCode: (c: number) => boolean;
  minSub: number;
}

const E4M3: Fmt = {
  name: 'e4m3',
  enc: encodeE4M3,
  dec: decodeE4M3,
  grid: e4m3Grid(),
  max: 448,
  maxCode: 0x7e,
  isNaNCode: (c) => (c & 0x7f) === 0x7f,
  minSub: 2 ** -9,
};
const E5M2: Fmt = {
  name: 'e5m2',
  enc: encodeE5M2,
  dec: decodeE5M2,
  grid: e5m2Grid(),
  max: 57344,
  maxCode: 0x7b,
  isNaNCode: (c) => (c & 0x7f) > 0x7c,
  minSub: 2 ** -16,
};

describe('decoders follow the format definitions', () => {
  it('E4M3 (e4m3fn): bias 7, no Inf, NaN only at S.1111.111', () => {
    for (let c = 0; c < 256; c++) {
      const v = decodeE4M3(c);
      if ((c & 0x7f) === 0x7f) expect(v).toBeNaN();
      else expect(Object.is(v, smallFloatValue(c, 4, 3, 7))).toBe(true);
    }
    expect(decodeE4M3(0x7e)).toBe(448);
    expect(decodeE4M3(0x08)).toBe(2 ** -6);
    expect(decodeE4M3(0x01)).toBe(2 ** -9);
    expect(decodeE4M3(0x78)).toBe(256); // exponent field 15 is finite in e4m3fn
    expect(Object.is(decodeE4M3(0x80), -0)).toBe(true);
    expect(E4M3_MAX).toBe(448);
  });

  it('E5M2: bias 15, Inf at S.11111.00, NaN above it', () => {
    for (let c = 0; c < 256; c++) {
      const v = decodeE5M2(c);
      const m = c & 0x7f;
      if (m === 0x7c) expect(v).toBe(c & 0x80 ? -Infinity : Infinity);
      else if (m > 0x7c) expect(v).toBeNaN();
      else expect(Object.is(v, smallFloatValue(c, 5, 2, 15))).toBe(true);
    }
    expect(decodeE5M2(0x7b)).toBe(57344);
    expect(decodeE5M2(0x01)).toBe(2 ** -16);
    expect(E5M2_MAX).toBe(57344);
  });

  it('reject codes outside 0..255', () => {
    expect(() => decodeE4M3(256)).toThrow(MoeflashError);
    expect(() => decodeE5M2(-1)).toThrow(MoeflashError);
    expect(() => decodeE4M3(0.5)).toThrow(MoeflashError);
  });
});

for (const F of [E4M3, E5M2]) {
  describe(`${F.name} encoder`, () => {
    it('every code round-trips in both modes (NaN codes to a NaN code; Inf only unsaturated)', () => {
      for (const saturate of [true, false]) {
        for (let c = 0; c < 256; c++) {
          const v = F.dec(c);
          const back = F.enc(v, { saturate });
          if (Number.isNaN(v)) {
            expect(F.isNaNCode(back), `${hex(c)} -> ${hex(back)}`).toBe(true);
          } else if (!Number.isFinite(v)) {
            // E5M2 +-Inf: kept when not saturating, clamped to +-max when saturating.
            expect(back).toBe(saturate ? (c & 0x80) | F.maxCode : c);
          } else {
            expect(back, `code ${hex(c)} value ${v}`).toBe(c);
          }
        }
      }
    });

    it('every tie between adjacent values rounds to the even code (exhaustive, both signs)', () => {
      const pos = F.grid.codes
        .map((c, k) => ({ c, v: F.grid.values[k] }))
        .filter(({ c }) => c < 0x80)
        .sort((a, b) => a.v - b.v);
      let ties = 0;
      for (let k = 0; k + 1 < pos.length; k++) {
        const lo = pos[k];
        const hi = pos[k + 1];
        const tie = (lo.v + hi.v) / 2;
        expect(Math.fround(tie)).toBe(tie); // one more bit than the format: exact in float32
        const even = (lo.c & 1) === 0 ? lo.c : hi.c;
        for (const s of [0, 0x80]) {
          const sg = s ? -1 : 1;
          for (const saturate of [true, false]) {
            expect(F.enc(sg * tie, { saturate }), `tie ${sg * tie}`).toBe(even | s);
            expect(F.enc(sg * nextDown(tie), { saturate })).toBe(lo.c | s);
            expect(F.enc(sg * nextUp(tie), { saturate })).toBe(hi.c | s);
          }
        }
        ties++;
      }
      expect(ties).toBe(F.name === 'e4m3' ? 126 : 123);
    });

    it('zeros, subnormals and values below half the smallest subnormal', () => {
      expect(F.enc(0)).toBe(0);
      expect(F.enc(-0)).toBe(0x80);
      expect(F.enc(F.minSub)).toBe(1);
      expect(F.enc(-F.minSub)).toBe(0x81);
      expect(F.enc(F.minSub / 2)).toBe(0); // tie with 0: even
      expect(F.enc(nextUp(F.minSub / 2))).toBe(1);
      expect(F.enc(-F.minSub / 4)).toBe(0x80);
      expect(F.enc(fromBits(1))).toBe(0); // float32 subnormal input
      expect(F.enc(-fromBits(0x007fffff))).toBe(0x80);
      expect(F.enc(1.5 * F.minSub)).toBe(2); // tie between 1 and 2 ulps: even
      expect(F.enc(2.5 * F.minSub)).toBe(2);
    });

    it('NaN keeps its sign bit and maps to the all-ones code', () => {
      expect(F.enc(NaN)).toBe(0x7f);
      expect(F.enc(NaN, { saturate: false })).toBe(0x7f);
      expect(F.enc(fromBits(0xffc00000)) & 0x7f).toBe(0x7f);
      expect(encodeFp8(new Float32Array(new Uint32Array([0xffc00000, 0x7f800001]).buffer), F.name))
        .toEqual(Uint8Array.of(0xff, 0x7f));
    });

    it('matches a brute-force nearest search (saturating mode) on random float32', () => {
      const check = (x: number) => {
        const got = F.enc(x);
        const want = nearestCode(x, F.grid, 0x80);
        if (got !== want) throw new Error(`${x}: got ${hex(got)}, want ${hex(want)}`);
      };
      fc.assert(fc.property(fc.float({ noNaN: true, noDefaultInfinity: true }), check), {
        numRuns: 20000,
      });
      fc.assert(
        fc.property(fc.float({ min: Math.fround(-1.1 * F.max), max: Math.fround(1.1 * F.max), noNaN: true }), check),
        { numRuns: 20000 },
      );
      fc.assert(
        fc.property(fc.float({ min: -64 * F.minSub, max: 64 * F.minSub, noNaN: true }), check),
        { numRuns: 20000 },
      );
    });

    it('non-saturating mode is the nearest search with PyTorch overflow rules', () => {
      // E4M3 rounds on a grid that continues to 480 (where NaN sits): past 464 is NaN.
      // E5M2 rounds on a grid that continues to 65536 (Inf): from 61440 up is Inf.
      const limit = F.name === 'e4m3' ? 464 : 61440;
      const over = F.name === 'e4m3' ? 0x7f : 0x7c;
      const check = (x: number) => {
        const got = F.enc(x, { saturate: false });
        const a = Math.abs(x);
        const sign = x < 0 || Object.is(x, -0) ? 0x80 : 0;
        const want =
          a > limit || (F.name === 'e5m2' && a === limit) ? sign | over : nearestCode(x, F.grid, 0x80);
        if (got !== want) throw new Error(`${x}: got ${hex(got)}, want ${hex(want)}`);
      };
      fc.assert(fc.property(fc.float({ noNaN: true }), check), { numRuns: 20000 });
      fc.assert(
        fc.property(fc.float({ min: Math.fround(-1.2 * F.max), max: Math.fround(1.2 * F.max), noNaN: true }), check),
        { numRuns: 20000 },
      );
    });

    it('array encoder equals the scalar encoder, in both modes', () => {
      fc.assert(
        fc.property(
          fc.array(fc.integer({ min: 0, max: 0xffffffff }), { maxLength: 64 }),
          fc.boolean(),
          (bits, saturate) => {
            const values = new Float32Array(Uint32Array.from(bits).buffer);
            const arr = encodeFp8(values, F.name, { saturate });
            for (let i = 0; i < values.length; i++) {
              const one = F.enc(values[i], { saturate });
              if (Number.isNaN(values[i])) expect(F.isNaNCode(arr[i])).toBe(true);
              else expect(arr[i]).toBe(one);
            }
          },
        ),
        { numRuns: 2000 },
      );
    });

    it('decodeFp8 equals the scalar decoder on every code', () => {
      const codes = Uint8Array.from({ length: 256 }, (_, i) => i);
      const d = decodeFp8(codes, F.name);
      for (let c = 0; c < 256; c++) {
        const v = F.dec(c);
        if (Number.isNaN(v)) expect(d[c]).toBeNaN();
        else expect(Object.is(d[c], v)).toBe(true);
      }
      const out = new Float32Array(300);
      expect(decodeFp8(codes, F.name, out)).toBe(out);
      expect(() => decodeFp8(codes, F.name, new Float32Array(10))).toThrow(MoeflashError);
    });
  });
}

describe('overflow modes', () => {
  it('E4M3 saturating: finite overflow and Inf clamp to +-448', () => {
    for (const x of [449, 464, 465, 480, 1e6, 3.4e38, Infinity]) {
      expect(encodeE4M3(x)).toBe(0x7e);
      expect(encodeE4M3(-x)).toBe(0xfe);
    }
  });

  it('E4M3 non-saturating (PyTorch cast): <= 464 rounds to 448, beyond is NaN', () => {
    expect(encodeE4M3(464, { saturate: false })).toBe(0x7e);
    expect(encodeE4M3(nextUp(464), { saturate: false })).toBe(0x7f);
    expect(encodeE4M3(-nextUp(464), { saturate: false })).toBe(0xff);
    for (const x of [480, 1e6, 3.4e38, Infinity]) {
      expect(encodeE4M3(x, { saturate: false })).toBe(0x7f);
      expect(encodeE4M3(-x, { saturate: false })).toBe(0xff);
    }
  });

  it('E5M2 saturating clamps to +-57344 (Inf too); non-saturating overflows to Inf as IEEE', () => {
    const tie = 61440; // midway between 57344 and the would-be 65536
    expect(encodeE5M2(tie)).toBe(0x7b);
    expect(encodeE5M2(1e30)).toBe(0x7b);
    expect(encodeE5M2(-Infinity)).toBe(0xfb);
    expect(encodeE5M2(nextDown(tie), { saturate: false })).toBe(0x7b);
    expect(encodeE5M2(tie, { saturate: false })).toBe(0x7c); // tie to even: 65536's mantissa 00
    expect(encodeE5M2(-1e30, { saturate: false })).toBe(0xfc);
    expect(encodeE5M2(Infinity, { saturate: false })).toBe(0x7c);
  });

  it('rejects unknown formats and short output buffers', () => {
    expect(() => encodeFp8(new Float32Array(2), 'e3m4' as 'e4m3')).toThrow(/unknown FP8 format/);
    expect(() => decodeFp8(new Uint8Array(2), 'x' as 'e5m2')).toThrow(MoeflashError);
    expect(() => encodeFp8(new Float32Array(4), 'e4m3', { out: new Uint8Array(3) })).toThrow(
      MoeflashError,
    );
  });
});

describe('block-scaled E4M3 weights (HF / DeepSeek-V3 layout)', () => {
  function randomWeight(rows: number, cols: number, seed: number): Float32Array {
    let s = seed >>> 0 || 1;
    const w = new Float32Array(rows * cols);
    for (let i = 0; i < w.length; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      const r = (s >>> 0) / 4294967296 - 0.5;
      w[i] = r * 2 ** ((i % 9) - 6);
    }
    return w;
  }

  it('scaleInv is [ceil(rows/128), ceil(cols/128)] with amax / 448 per (partial) block', () => {
    const rows = 200;
    const cols = 300;
    const w = randomWeight(rows, cols, 7);
    const { data, scaleInv } = quantizeFp8Blocked(w, rows, cols);
    expect(data.length).toBe(rows * cols);
    expect(scaleInv.length).toBe(2 * 3);
    for (let bi = 0; bi < 2; bi++) {
      for (let bj = 0; bj < 3; bj++) {
        let amax = 0;
        for (let r = bi * 128; r < Math.min(rows, bi * 128 + 128); r++) {
          for (let c = bj * 128; c < Math.min(cols, bj * 128 + 128); c++) {
            amax = Math.max(amax, Math.abs(w[r * cols + c]));
          }
        }
        const s = scaleInv[bi * 3 + bj];
        expect(s).toBe(Math.fround(amax / 448));
        for (let r = bi * 128; r < Math.min(rows, bi * 128 + 128); r++) {
          for (let c = bj * 128; c < Math.min(cols, bj * 128 + 128); c++) {
            const i = r * cols + c;
            expect(data[i]).toBe(encodeE4M3(Math.fround(w[i] / s)));
          }
        }
      }
    }
    // The block maximum lands on +-448 (code 0x7E / 0xFE).
    let maxCodes = 0;
    for (const c of data) if ((c & 0x7f) === 0x7e) maxCodes++;
    expect(maxCodes).toBeGreaterThanOrEqual(6);
  });

  it('dequantizes to within half an E4M3 step of each weight', () => {
    const rows = 130;
    const cols = 257;
    const w = randomWeight(rows, cols, 99);
    const q = quantizeFp8Blocked(w, rows, cols);
    const d = dequantizeFp8Blocked(q.data, q.scaleInv, rows, cols);
    for (let i = 0; i < w.length; i++) {
      const r = Math.floor(i / cols);
      const c = i % cols;
      const s = q.scaleInv[Math.floor(r / 128) * 3 + Math.floor(c / 128)];
      expect(d[i]).toBe(Math.fround(decodeE4M3(q.data[i]) * s));
      // relative 2^-4 for normals, absolute 2^-10 * s in the subnormal range, plus float32 slack
      const bound = Math.max(Math.abs(w[i]) * 2 ** -4, s * 2 ** -10) * (1 + 2 ** -20);
      expect(Math.abs(d[i] - w[i])).toBeLessThanOrEqual(bound);
    }
  });

  it('an all-zero block gets scaleInv 1 and zero codes; other block sizes work', () => {
    const w = new Float32Array(4 * 6);
    w[5] = -3;
    const q = quantizeFp8Blocked(w, 4, 6, [2, 3]);
    expect(Array.from(q.scaleInv)).toEqual([1, Math.fround(3 / 448), 1, 1]); // [0, 5] is in block (0, 1)
    expect(q.data[5]).toBe(0xfe);
    expect(dequantizeFp8Blocked(q.data, q.scaleInv, 4, 6, [2, 3])[5]).toBe(-3);
  });

  it('a block whose amax / 448 underflows still gets a positive scale', () => {
    const w = Float32Array.of(fromBits(3), -fromBits(1));
    const q = quantizeFp8Blocked(w, 1, 2);
    expect(q.scaleInv[0]).toBeGreaterThan(0);
    const d = dequantizeFp8Blocked(q.data, q.scaleInv, 1, 2);
    expect(d[0]).toBe(fromBits(3));
    expect(d[1]).toBe(-fromBits(1));
  });

  it('rejects non-finite weights and bad shapes with clear errors', () => {
    const w = new Float32Array(6);
    w[4] = NaN;
    expect(() => quantizeFp8Blocked(w, 2, 3)).toThrow(/weight \[1, 1\] is NaN/);
    expect(() => quantizeFp8Blocked(new Float32Array(6), 2, 4)).toThrow(/do not form a \[2, 4\]/);
    expect(() => quantizeFp8Blocked(new Float32Array(6), 2, 3, [0, 128])).toThrow(MoeflashError);
    expect(() =>
      dequantizeFp8Blocked(new Uint8Array(6), new Float32Array(2), 2, 3),
    ).toThrow(/scaleInv has 2 entries, expected 1/);
  });
});
