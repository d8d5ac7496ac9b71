/**
 * The tensor-core MoE layer (kernels/moe_mma.cu) against a float64 reference of the whole layer:
 * route weights x (down(activation(gate_up x + b)) + b), summed per token in slot order. Covers
 * the decode path (<= 8 tokens, one n-tile), the grouped path (experts with more pairs than an
 * item holds are split over several items), both activations and row orders, and batch
 * invariance. Needs an NVIDIA GPU and the built addon; skipped with the reason otherwise.
 *
 * Limit 2e-3: the activation vectors enter the tensor cores as f16 (scaled by a power of two per
 * vector, so nothing overflows), which rounds them at 2^-11 relative; the weights are exact.
 */
import { describe, expect, it } from 'vitest';

import type { ExpertActivation } from '@moeflash/core';

import { cudaOps, isCudaAvailable } from '../src/index.js';
import {
  activate,
  CLAMPED,
  dot64,
  expertRows,
  firstMismatch,
  logCheck,
  randomBf16,
  randomF32,
  randomMxfp4,
  randomNormal,
  randomRouting,
  relError,
  rng,
  SWIGLU,
} from './helpers.js';

const cuda = isCudaAvailable();
if (!cuda.ok) console.log(`[cuda] tensor-core MoE tests skipped: ${cuda.reason}`);

const LIMIT = 2e-3;

interface Layer {
  E: number;
  H: number;
  I: number;
  act: ExpertActivation;
  gateUp: { blocks: Uint8Array; scales: Uint8Array; bias: Uint16Array | null };
  down: { blocks: Uint8Array; scales: Uint8Array; bias: Uint16Array | null };
  guBias: Float32Array | null;
  dnBias: Float32Array | null;
}

function makeLayer(E: number, H: number, I: number, act: ExpertActivation, withBias: boolean, seed: number): Layer {
  const r = rng(seed);
  const gu = randomMxfp4(E, 2 * I, H, r);
  const dn = randomMxfp4(E, H, I, r);
  const guB = withBias ? randomBf16(E * 2 * I, r, 0.5) : null;
  const dnB = withBias ? randomBf16(E * H, r, 0.5) : null;
  return {
    E,
    H,
    I,
    act,
    gateUp: { ...gu, bias: guB?.bits ?? null },
    down: { ...dn, bias: dnB?.bits ?? null },
    guBias: guB?.values ?? null,
    dnBias: dnB?.values ?? null,
  };
}

function reference(L: Layer, x: Float32Array, ids: Int32Array, weights: Float32Array, T: number, K: number): Float64Array {
  const { H, I } = L;
  const interleaved = L.act.kind !== 'swiglu';
  const y = new Float64Array(T * H);
  const gu = new Map<number, Float32Array>();
  const dn = new Map<number, Float32Array>();
  const a = new Float64Array(I);
  for (let t = 0; t < T; t++)
    for (let k = 0; k < K; k++) {
      const e = ids[t * K + k];
      if (!gu.has(e)) {
        gu.set(e, expertRows(L.gateUp, 2 * I, H, e, 0, 2 * I));
        dn.set(e, expertRows(L.down, H, I, e, 0, H));
      }
      const wgu = gu.get(e)!;
      const wdn = dn.get(e)!;
      for (let o = 0; o < I; o++) {
        const gr = interleaved ? 2 * o : o;
        const ur = interleaved ? 2 * o + 1 : I + o;
        const g = dot64(wgu, gr * H, x, t * H, H) + (L.guBias ? L.guBias[e * 2 * I + gr] : 0);
        const u = dot64(wgu, ur * H, x, t * H, H) + (L.guBias ? L.guBias[e * 2 * I + ur] : 0);
        a[o] = activate(g, u, L.act);
      }
      for (let h = 0; h < H; h++) {
        const v = dot64(wdn, h * I, a, 0, I) + (L.dnBias ? L.dnBias[e * H + h] : 0);
        y[t * H + h] += weights[t * K + k] * v;
      }
    }
  return y;
}

function run(L: Layer, x: Float32Array, ids: Int32Array, weights: Float32Array, T: number, K: number, repeat = 1) {
  return cudaOps().moeMma({
    gateUp: L.gateUp,
    down: L.down,
    x,
    expertIds: ids,
    expertWeights: weights,
    tokens: T,
    topK: K,
    numExperts: L.E,
    hidden: L.H,
    inter: L.I,
    activation: L.act,
    repeat,
  });
}

describe.skipIf(!cuda.ok)('moe_mxfp4_mma (tensor cores)', () => {
  it.each([
    ['gpt-oss clamped, biases', 8, 256, 128, 1, 4, CLAMPED, true],
    ['gpt-oss clamped, biases', 8, 256, 128, 3, 4, CLAMPED, true],
    ['gpt-oss clamped, biases', 8, 256, 128, 8, 4, CLAMPED, true],
    ['swiglu', 16, 512, 256, 5, 2, SWIGLU, false],
    ['swiglu, top-8', 64, 128, 64, 8, 8, SWIGLU, false],
    ['grouped: experts split over items', 8, 256, 192, 40, 4, CLAMPED, true],
    ['grouped, swiglu', 32, 128, 64, 300, 2, SWIGLU, false],
    ['gpt-oss-20b shape', 8, 2880, 2880, 1, 4, CLAMPED, true],
    ['gpt-oss-20b shape', 8, 2880, 2880, 8, 4, CLAMPED, true],
    ['qwen3-30b-a3b shape', 16, 2048, 768, 12, 8, SWIGLU, false],
  ] as const)('%s E=%i H=%i I=%i T=%i K=%i', (name, E, H, I, T, K, act, withBias) => {
    const L = makeLayer(E, H, I, act, withBias, E * 7919 + H + I * 3 + T * 11 + K);
    const r = rng(T * 101 + K);
    const x = randomNormal(T * H, r);
    const ids = randomRouting(T, K, E, r);
    const weights = randomF32(T * K, r).map(Math.abs);
    const got = run(L, x, ids, weights, T, K);
    const err = relError(got, reference(L, x, ids, weights, T, K));
    logCheck(`moe mma ${name} E=${E} H=${H} I=${I} T=${T} K=${K}`, err, LIMIT);
    expect(err).toBeLessThanOrEqual(LIMIT);
  });

  it('gives a token the same bits alone, in a decode batch and in a grouped batch', () => {
    const L = makeLayer(8, 256, 128, CLAMPED, true, 99);
    const r = rng(5);
    const T = 40, K = 4, H = 256;
    const x = randomNormal(T * H, r, 3);
    const ids = randomRouting(T, K, 8, r);
    const weights = randomF32(T * K, r).map(Math.abs);
    const all = run(L, x, ids, weights, T, K);
    const some = run(L, x.subarray(0, 6 * H), ids.subarray(0, 6 * K), weights.subarray(0, 6 * K), 6, K);
    const t = 5;
    const one = run(L, x.subarray(t * H, (t + 1) * H), ids.subarray(t * K, (t + 1) * K), weights.subarray(t * K, (t + 1) * K), 1, K);
    const same = (a: Float32Array, b: Float32Array) => firstMismatch(a, b);
    logCheck('moe mma token 5: alone vs 6-token batch vs 40-token batch', same(one, some.subarray(t * H, (t + 1) * H)) < 0 && same(one, all.subarray(t * H, (t + 1) * H)) < 0 ? 'identical' : 'different');
    expect(same(one, some.subarray(t * H, (t + 1) * H))).toBe(-1);
    expect(same(one, all.subarray(t * H, (t + 1) * H))).toBe(-1);
  });

  it('leaves its counters at zero so the next launch is right (repeated launches)', () => {
    const L = makeLayer(8, 256, 128, SWIGLU, false, 7);
    const r = rng(8);
    const T = 3, K = 2;
    const x = randomNormal(T * 256, r);
    const ids = randomRouting(T, K, 8, r);
    const weights = randomF32(T * K, r).map(Math.abs);
    const once = run(L, x, ids, weights, T, K, 1);
    const thrice = run(L, x, ids, weights, T, K, 3);
    expect(firstMismatch(once, thrice)).toBe(-1);
  });

  it('rejects shapes the tensor-core path does not take', () => {
    const L = makeLayer(2, 96, 64, SWIGLU, false, 3);
    expect(() => run(L, new Float32Array(96), Int32Array.from([0]), Float32Array.from([1]), 1, 1)).toThrow(/multiples of 64/);
  });
});
