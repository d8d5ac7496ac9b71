import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MoeflashError } from '@moeflash/core';
import {
  E2M1_VALUES,
  decodeE2M1,
  decodeE8M0,
  dequantizeMxfp4,
  encodeE2M1,
  mxfp4SharedExponent,
  quantizeMxfp4,
} from '../src/index.js';
import {
  bitsOf,
  e2m1Grid,
  fromBits,
  hex,
  mxfp4Ref,
  nearestCode,
  nextDown,
  nextUp,
  unpackNibbles,
} from './reference.js';

const F32_MAX = fromBits(0x7f7fffff);

/** A block of 32 with the given leading values, the rest zeros. */
function block(...head: number[]): Float32Array {
  const b = new Float32Array(32);
  b.set(head);
  return b;
}

function codesOf(values: Float32Array, rule: 'ocp' | 'no-clip' = 'ocp') {
  const q = quantizeMxfp4(values, { scaleRule: rule });
  return { codes: unpackNibbles(q.blocks), scales: q.scales, q };
}

describe('E2M1 elements', () => {
  it('decodes every code per the spec table', () => {
    const want = [0, 0.5, 1, 1.5, 2, 3, 4, 6];
    for (let c = 0; c < 16; c++) {
      const v = decodeE2M1(c);
      expect(v).toBe(c < 8 ? want[c] : -want[c - 8]);
      expect(E2M1_VALUES[c]).toBe(v);
    }
    expect(Object.is(decodeE2M1(8), -0)).toBe(true);
    expect(() => decodeE2M1(16)).toThrow(MoeflashError);
    expect(() => decodeE2M1(1.5)).toThrow(MoeflashError);
  });

  it('every code round-trips through encode (0x8 stays -0)', () => {
    for (let c = 0; c < 16; c++) expect(encodeE2M1(decodeE2M1(c))).toBe(c);
  });

  it('every tie goes to the even mantissa, both signs, and neighbours go to the nearer side', () => {
    const grid = e2m1Grid();
    const pos = grid.values.slice(0, 8);
    for (let k = 0; k + 1 < pos.length; k++) {
      const lo = k;
      const hi = k + 1;
      const tie = (pos[lo] + pos[hi]) / 2;
      const even = (lo & 1) === 0 ? lo : hi;
      for (const sgn of [1, -1]) {
        const s = sgn < 0 ? 8 : 0;
        expect(encodeE2M1(sgn * tie), `tie ${sgn * tie}`).toBe(even | s);
        expect(encodeE2M1(sgn * nextDown(tie))).toBe(lo | s);
        expect(encodeE2M1(sgn * nextUp(tie))).toBe(hi | s);
      }
    }
    // The spec's list, spelled out.
    const ties: Array<[number, number]> = [
      [0.25, 0], [0.75, 1], [1.25, 1], [1.75, 2], [2.5, 2], [3.5, 4], [5, 4],
    ];
    for (const [x, v] of ties) expect(E2M1_VALUES[encodeE2M1(x)]).toBe(v);
  });

  it('saturates, keeps the sign of zero and rejects NaN', () => {
    expect(encodeE2M1(6.0001)).toBe(7);
    expect(encodeE2M1(1e30)).toBe(7);
    expect(encodeE2M1(Infinity)).toBe(7);
    expect(encodeE2M1(-Infinity)).toBe(15);
    expect(encodeE2M1(0)).toBe(0);
    expect(encodeE2M1(-0)).toBe(8);
    expect(encodeE2M1(-0.1)).toBe(8);
    expect(encodeE2M1(1e-45)).toBe(0);
    expect(() => encodeE2M1(NaN)).toThrow(MoeflashError);
  });

  it('matches a brute-force nearest search on random float32 inputs', () => {
    const grid = e2m1Grid();
    fc.assert(
      fc.property(fc.float({ noNaN: true, noDefaultInfinity: true }), (x) => {
        expect(encodeE2M1(x)).toBe(nearestCode(x, grid, 8));
      }),
      { numRuns: 20000 },
    );
    fc.assert(
      fc.property(fc.float({ min: -8, max: 8, noNaN: true }), (x) => {
        expect(encodeE2M1(x)).toBe(nearestCode(x, grid, 8));
      }),
      { numRuns: 20000 },
    );
  });
});

describe('E8M0 scales', () => {
  it('code c is 2^(c - 127) and 0xFF is NaN', () => {
    for (let c = 0; c < 255; c++) expect(decodeE8M0(c)).toBe(2 ** (c - 127));
    expect(decodeE8M0(0xff)).toBeNaN();
    expect(() => decodeE8M0(256)).toThrow(MoeflashError);
  });

  it('shared exponent from the bits matches floor(log2) by comparison', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 0x7f7fffff }), (bits) => {
        const x = fromBits(bits);
        let e = 0;
        while (2 ** e > x) e--;
        while (2 ** (e + 1) <= x) e++;
        expect(mxfp4SharedExponent(bits, 'ocp')).toBe(Math.max(-127, e - 2));
      }),
      { numRuns: 20000 },
    );
  });
});

describe('quantizeMxfp4', () => {
  it('rejects a length that is not a multiple of 32, and unknown rules', () => {
    const err = (() => {
      try {
        quantizeMxfp4(new Float32Array(33));
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(MoeflashError);
    expect((err as MoeflashError).code).toBe('INVALID_ARGUMENT');
    expect((err as MoeflashError).message).toMatch(/multiple of the block size 32/);
    expect(() => quantizeMxfp4(new Float32Array(32), { scaleRule: 'x' as 'ocp' })).toThrow(
      /unknown scaleRule/,
    );
    expect(() => quantizeMxfp4(new Float32Array(64), { blocks: new Uint8Array(16) })).toThrow(
      /too small/,
    );
    const empty = quantizeMxfp4(new Float32Array(0));
    expect(empty.blocks.length).toBe(0);
    expect(empty.scales.length).toBe(0);
  });

  it('packs element 2i in the low nibble and 2i+1 in the high nibble, 16 bytes a block', () => {
    // amax 6 gives X = 1, so the codes are the values' own: 6 -> 7, 0.5 -> 1, -1 -> 0xA, 3 -> 5.
    const { q } = codesOf(block(6, 0.5, -1, 3));
    expect(q.blocks.length).toBe(16);
    expect(q.scales.length).toBe(1);
    expect(q.scales[0]).toBe(127);
    expect(q.blocks[0]).toBe(0x17);
    expect(q.blocks[1]).toBe(0x5a);
    for (let i = 2; i < 16; i++) expect(q.blocks[i]).toBe(0);
  });

  it("OCP rule: a block max of 7.9 saturates to 6 * X; 'no-clip' does not", () => {
    const values = block(7.9, 1, -7.9);
    const ocp = codesOf(values, 'ocp');
    expect(ocp.scales[0]).toBe(127); // floor(log2 7.9) - 2 = 0
    expect(dequantizeMxfp4(ocp.q.blocks, ocp.q.scales).slice(0, 3)).toEqual(
      Float32Array.of(6, 1, -6),
    );
    const nc = codesOf(values, 'no-clip');
    expect(nc.scales[0]).toBe(128); // 7.9 / 2 <= 6
    expect(dequantizeMxfp4(nc.q.blocks, nc.q.scales).slice(0, 3)).toEqual(
      Float32Array.of(8, 1, -8),
    );
    // At exactly 1.5 * 2^E both rules agree: the max is representable as 6 * X.
    expect(codesOf(block(6)).scales[0]).toBe(codesOf(block(6), 'no-clip').scales[0]);
    expect(codesOf(block(nextUp(6)), 'no-clip').scales[0]).toBe(128);
  });

  it('no-clip never saturates the block max', () => {
    fc.assert(
      fc.property(fc.float({ min: fromBits(0x00800000), max: F32_MAX / 4, noNaN: true }), (m) => {
        const { q } = codesOf(block(m), 'no-clip');
        const d = dequantizeMxfp4(q.blocks, q.scales)[0];
        const x = 2 ** (q.scales[0] - 127);
        expect(m / x).toBeLessThanOrEqual(6);
        expect(Math.abs(d - m)).toBeLessThanOrEqual(x); // half of the widest step, 2X
      }),
      { numRuns: 5000 },
    );
  });

  it('NaN or infinity makes the block NaN without touching its neighbours', () => {
    for (const bad of [NaN, Infinity, -Infinity, fromBits(0xffc00001)]) {
      const values = new Float32Array(96);
      values[0] = 3;
      values[32 + 5] = 1;
      values[32 + 7] = bad;
      values[64] = -2;
      const { q, codes } = codesOf(values);
      expect(q.scales[1]).toBe(0xff);
      for (let i = 32; i < 64; i++) expect(codes[i]).toBe(0);
      expect(q.scales[0]).not.toBe(0xff);
      expect(q.scales[2]).not.toBe(0xff);
      const d = dequantizeMxfp4(q.blocks, q.scales);
      for (let i = 32; i < 64; i++) expect(d[i]).toBeNaN();
      expect(d[0]).toBe(3);
      expect(d[64]).toBe(-2);
    }
  });

  it('an all-zero block gets scale code 0 and zero codes (-0 kept as 0x8)', () => {
    const z = codesOf(new Float32Array(32));
    expect(z.scales[0]).toBe(0);
    expect([...z.codes]).toEqual(new Array(32).fill(0));
    const nz = codesOf(block(-0, 0, -0));
    expect(nz.scales[0]).toBe(0);
    expect([...nz.codes.slice(0, 4)]).toEqual([8, 0, 8, 0]);
    expect(codesOf(new Float32Array(32), 'no-clip').scales[0]).toBe(0);
  });

  it('clamps the scale at 2^-127 for tiny and subnormal blocks, rounding the exact quotient', () => {
    const tiny = 2 ** -127; // X at the clamp; elements are multiples of X / 2, some subnormal
    // amax = 4X would ask for e = -127 anyway; 2^-125 and smaller clamp.
    for (const amax of [2 ** -125, 2 ** -130, fromBits(1), fromBits(0x007fffff)]) {
      expect(codesOf(block(amax)).scales[0]).toBe(0);
      expect(codesOf(block(amax), 'no-clip').scales[0]).toBe(0);
    }
    expect(codesOf(block(2 ** -124)).scales[0]).toBe(1);
    // The quotient v / 2^-127 for v = 0.75 * 2^-127 (a float32 subnormal) is exactly the 0.75
    // tie, which rounds up to 1; one float32 step below it rounds down to 0.5.
    const v = 0.75 * tiny;
    const { codes } = codesOf(block(4 * tiny, v, nextDown(v), 0.25 * tiny, nextUp(0.25 * tiny), 2 ** -149));
    expect([...codes.slice(0, 6)]).toEqual([6, 2, 1, 0, 1, 0]);
  });

  it('reaches the top of the float32 range without overflow', () => {
    const ocp = codesOf(block(F32_MAX, -F32_MAX / 2));
    expect(ocp.scales[0]).toBe(127 + 125);
    expect([...ocp.codes.slice(0, 2)]).toEqual([7, 0xe]); // 2^128 - eps -> saturates to 6X; half -> 4X
    const nc = codesOf(block(F32_MAX), 'no-clip');
    expect(nc.scales[0]).toBe(127 + 126);
    expect(nc.codes[0]).toBe(6); // 1.99.. * 2^127 / 2^126 = 3.99.. -> 4
    // 4 * 2^126 is 2^128: past float32, so the decoder gives Infinity.
    expect(dequantizeMxfp4(nc.q.blocks, nc.q.scales)[0]).toBe(Infinity);
    expect(dequantizeMxfp4(ocp.q.blocks, ocp.q.scales)[0]).toBe(6 * 2 ** 125);
  });

  it('rounds every E2M1 tie to even at every reachable scale (exhaustive), both signs', () => {
    const grid = e2m1Grid();
    const ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5];
    for (let e = -127; e <= 125; e++) {
      const x = 2 ** e;
      const vals: number[] = [4 * x];
      for (const t of ties) {
        const tv = t * x;
        vals.push(tv, nextDown(tv), nextUp(tv), -tv, -nextDown(tv), -nextUp(tv));
      }
      const input = new Float32Array(64);
      input.set(vals);
      input[32] = 4 * x;
      input.set(vals.slice(22), 33);
      const { codes, scales } = codesOf(input);
      expect(scales[0], `scale at e=${e}`).toBe(e + 127);
      expect(scales[1]).toBe(e + 127);
      for (let i = 0; i < 64; i++) {
        const want = nearestCode(input[i] / x, grid, 8);
        if (codes[i] !== want) {
          throw new Error(`e=${e} v=${input[i]} (${hex(bitsOf(input[i]), 8)}): got ${codes[i]}, want ${want}`);
        }
      }
    }
  });

  const weightLike = fc
    .tuple(
      fc.integer({ min: -140, max: 126 }),
      fc.array(fc.double({ min: -8, max: 8, noNaN: true }), { minLength: 32, maxLength: 32 }),
    )
    .map(([e, xs]) => Float32Array.from(xs, (x) => x * 2 ** e));
  const anyBits = fc
    .array(fc.integer({ min: 0, max: 0xffffffff }), { minLength: 32, maxLength: 32 })
    .map((bs) => {
      const u = Uint32Array.from(bs);
      return new Float32Array(u.buffer);
    });
  const sparse = fc
    .array(
      fc.oneof(
        fc.constant(0),
        fc.constant(-0),
        fc.float({ noNaN: true, noDefaultInfinity: true }),
        fc.constantFrom(0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, 7.9, 8),
      ),
      { minLength: 32, maxLength: 32 },
    )
    .map((xs) => Float32Array.from(xs));

  for (const rule of ['ocp', 'no-clip'] as const) {
    it(`matches the spec reference on random blocks (${rule})`, () => {
      fc.assert(
        fc.property(fc.oneof(weightLike, anyBits, sparse), (values) => {
          const ref = mxfp4Ref(values, rule);
          const got = codesOf(values, rule);
          expect([...got.scales]).toEqual([...ref.scales]);
          if (ref.scales[0] !== 0xff) expect([...got.codes]).toEqual([...ref.codes]);
        }),
        { numRuns: 4000 },
      );
    });
  }

  it('is idempotent: dequantize then quantize again gives the same values', () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.integer({ min: -100, max: 100 }), fc.double({ min: -1, max: 1, noNaN: true })), {
          minLength: 64,
          maxLength: 64,
        }),
        fc.constantFrom('ocp' as const, 'no-clip' as const),
        (pairs, rule) => {
          const values = Float32Array.from(pairs, ([e, m]) => m * 2 ** e);
          const q1 = quantizeMxfp4(values, { scaleRule: rule });
          const d1 = dequantizeMxfp4(q1.blocks, q1.scales);
          const q2 = quantizeMxfp4(d1, { scaleRule: rule });
          expect(dequantizeMxfp4(q2.blocks, q2.scales)).toEqual(d1);
        },
      ),
      { numRuns: 2000 },
    );
  });

  it('every packed byte at every finite-decodable scale code round-trips', () => {
    // Each block pins one element at 6X so the scale rule recovers the same code; scale codes
    // above 252 put 6X beyond float32 and cannot come back from float32 data.
    for (const rule of ['ocp', 'no-clip'] as const) {
      for (let sc = 0; sc <= 252; sc++) {
        const nBlocks = 18;
        const blocks = new Uint8Array(nBlocks * 16);
        const scales = new Uint8Array(nBlocks).fill(sc);
        let byte = 0;
        for (let b = 0; b < nBlocks; b++) {
          blocks[b * 16] = 0x77;
          for (let j = 1; j < 16; j++) blocks[b * 16 + j] = byte++ & 0xff;
        }
        const d = dequantizeMxfp4(blocks, scales);
        const q = quantizeMxfp4(d, { scaleRule: rule });
        expect(q.scales).toEqual(scales);
        if (!q.blocks.every((v, i) => v === blocks[i])) {
          const i = q.blocks.findIndex((v, k) => v !== blocks[k]);
          throw new Error(`${rule} scale ${sc}: byte ${i} ${hex(blocks[i])} came back ${hex(q.blocks[i])}`);
        }
      }
    }
  });

  it('writes into caller buffers without allocating new ones', () => {
    const values = Float32Array.from({ length: 64 }, (_, i) => i - 32);
    const blocks = new Uint8Array(40).fill(0xee);
    const scales = new Uint8Array(3).fill(0xee);
    const r = quantizeMxfp4(values, { blocks, scales });
    expect(r.blocks).toBe(blocks);
    expect(r.scales).toBe(scales);
    const fresh = quantizeMxfp4(values);
    expect(blocks.subarray(0, 32)).toEqual(fresh.blocks);
    expect(scales.subarray(0, 2)).toEqual(fresh.scales);
    expect(blocks[32]).toBe(0xee);
    expect(scales[2]).toBe(0xee);
  });

  it('reads a subarray view at its own offset', () => {
    const big = Float32Array.from({ length: 96 }, (_, i) => (i % 7) - 3);
    const view = big.subarray(32, 64);
    expect(quantizeMxfp4(view)).toEqual(quantizeMxfp4(Float32Array.from(view)));
  });
});

describe('dequantizeMxfp4', () => {
  it('decodes each element as E2M1 value times the scale, honouring count', () => {
    const blocks = new Uint8Array(32);
    const scales = Uint8Array.of(127 + 3, 127 - 130 + 130); // 2^3 and 2^0
    for (let i = 0; i < 32; i++) blocks[i] = (i * 37) & 0xff;
    const d = dequantizeMxfp4(blocks, scales);
    expect(d.length).toBe(64);
    for (let i = 0; i < 64; i++) {
      const byte = blocks[i >> 1];
      const code = i & 1 ? byte >> 4 : byte & 15;
      const x = i < 32 ? 8 : 1;
      expect(Object.is(d[i], E2M1_VALUES[code] * x)).toBe(true);
    }
    const part = dequantizeMxfp4(blocks, scales, 45);
    expect(part).toEqual(d.subarray(0, 45));
    expect(dequantizeMxfp4(blocks, scales, 0).length).toBe(0);
    expect(() => dequantizeMxfp4(blocks, scales, 65)).toThrow(MoeflashError);
    expect(() => dequantizeMxfp4(blocks, scales, 1.5)).toThrow(MoeflashError);
    expect(() => dequantizeMxfp4(blocks.subarray(1), scales)).toThrow(/do not match/);
  });

  it('decodes the smallest scale exactly (subnormal float32 results)', () => {
    const blocks = new Uint8Array(16);
    for (let j = 0; j < 8; j++) blocks[j] = j | ((j + 8) << 4);
    const d = dequantizeMxfp4(blocks, Uint8Array.of(0));
    for (let j = 0; j < 8; j++) {
      expect(d[2 * j]).toBe(E2M1_VALUES[j] * 2 ** -127);
      expect(d[2 * j + 1]).toBe(-E2M1_VALUES[j] * 2 ** -127);
    }
  });
});
