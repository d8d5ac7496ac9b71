import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { attendOne } from '@moeflash/core';
import { attendInterleaved } from '../src/backends/cpu/attention.js';

/** The CPU backend's interleaved attention must be the readable reference, bit for bit. */
describe('attendInterleaved == attendOne', () => {
  it('gives identical bits for any shape, range and sinks', () => {
    fc.assert(
      fc.property(
        fc.record({
          kvHeads: fc.integer({ min: 1, max: 3 }),
          group: fc.integer({ min: 1, max: 3 }),
          headDim: fc.integer({ min: 1, max: 19 }),
          len: fc.integer({ min: 1, max: 23 }),
          from: fc.nat(),
          sinks: fc.boolean(),
          seed: fc.integer({ min: 1, max: 2 ** 31 - 1 }),
        }),
        ({ kvHeads, group, headDim, len, from, sinks, seed }) => {
          let s = seed;
          const rnd = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
          const numHeads = kvHeads * group;
          const shape = { numHeads, numKvHeads: kvHeads, headDim, scale: 1 / Math.sqrt(headDim) };
          const q = Float32Array.from({ length: numHeads * headDim }, rnd);
          const keys = Float32Array.from({ length: len * kvHeads * headDim }, rnd);
          const values = Float32Array.from({ length: len * kvHeads * headDim }, rnd);
          const sink = sinks ? Float32Array.from({ length: numHeads }, rnd) : null;
          const start = from % len;
          const a = new Float32Array(numHeads * headDim);
          const b = new Float32Array(numHeads * headDim);
          attendOne(q, 0, keys, values, start, len - 1, shape, sink, a, 0, new Float64Array(len));
          attendInterleaved(q, 0, keys, values, start, len - 1, shape, sink, b, 0, new Float64Array(len));
          expect(Buffer.from(b.buffer).equals(Buffer.from(a.buffer))).toBe(true);
        },
      ),
      { numRuns: 300 },
    );
  });
});
