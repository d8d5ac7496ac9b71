/**
 * Every CUDA kernel family against its TypeScript twin (@moeflash/core math/ and sampling/, or a
 * float64 reference here) on fresh random inputs. Needs an NVIDIA GPU and the built addon; where
 * either is missing each suite is skipped and the reason printed.
 *
 * Limits: ||out - ref|| / ||ref|| <= 1e-3 for float32 paths (the kernels read bf16/MXFP4 weights
 * exactly and compute in float32, so they land near 1e-6); exact equality for indices (top-k,
 * argmax, sampled tokens) and for pure conversions. Each check prints its measured error.
 */
import { describe, expect, it } from 'vitest';

import {
  applyRope,
  argmax as refArgmax,
  attendOne,
  linear,
  mlpForward,
  mlpScratch,
  philox4x32,
  rmsNorm,
  ropeTable,
  route,
  rngKey,
  sampleToken,
  uniform,
  MoeflashError,
  type MoeSpec,
  type RopeSpec,
} from '@moeflash/core';

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
const skip = !cuda.ok;
if (!cuda.ok) console.log(`[cuda] GPU kernel tests skipped: ${cuda.reason}`);
else console.log(`[cuda] running on ${cuda.devices.map((d) => `${d.name} (sm_${d.major}${d.minor}, ${d.multiprocessors} SMs)`).join(', ')}`);

const F32_LIMIT = 1e-3;
const ops = () => cudaOps();

function expectClose(name: string, out: ArrayLike<number>, ref: ArrayLike<number>, limit = F32_LIMIT): void {
  const err = relError(out, ref);
  logCheck(name, err, limit);
  expect(err, name).toBeLessThanOrEqual(limit);
}

function expectSame(name: string, out: ArrayLike<number>, ref: ArrayLike<number>): void {
  const i = firstMismatch(out, ref);
  logCheck(name, i < 0 ? 'identical' : `first difference at ${i}: ${out[i]} vs ${ref[i]}`);
  expect(i, name).toBe(-1);
}

describe.skipIf(skip)('embedding_bf16', () => {
  it.each([
    [1000, 2880, 7],
    [50, 64, 1],
  ])('vocab %i hidden %i tokens %i: exact bf16 -> float32 gather', (vocab, hidden, tokens) => {
    const r = rng(vocab + hidden);
    const table = randomBf16(vocab * hidden, r);
    const ids = new Int32Array(tokens).map(() => Math.floor(r() * vocab));
    ids[0] = vocab - 1;
    const out = ops().embedding({ table: table.bits, hidden, ids });
    const ref = new Float32Array(tokens * hidden);
    for (let t = 0; t < tokens; t++) ref.set(table.values.subarray(ids[t] * hidden, (ids[t] + 1) * hidden), t * hidden);
    expectSame(`embedding ${vocab}x${hidden}`, out, ref);
  });
});

describe.skipIf(skip)('rmsnorm_residual', () => {
  it.each([
    [5, 2880, true],
    [3, 2880, false],
    [37, 128, true],
    [4, 4096, true],
  ])('rows %i hidden %i residual %s', (rows, hidden, withResidual) => {
    const r = rng(rows * hidden);
    const x = randomNormal(rows * hidden, r, 3);
    const residual = withResidual ? randomNormal(rows * hidden, r, 1) : null;
    const w = randomBf16(hidden, r, 2);
    const eps = 1e-5;
    const got = ops().rmsnorm({ x, residual, weight: w.bits, eps, rows });
    const sum = new Float32Array(x);
    if (residual) for (let i = 0; i < sum.length; i++) sum[i] += residual[i];
    const ref = new Float32Array(rows * hidden);
    for (let row = 0; row < rows; row++) rmsNorm(sum, w.values, eps, ref, row * hidden);
    expectSame(`rmsnorm x + residual ${rows}x${hidden}`, got.x, sum);
    expectClose(`rmsnorm out ${rows}x${hidden}`, got.out, ref);
  });
});

describe.skipIf(skip)('rope_rotate_half', () => {
  const yarn: RopeSpec = {
    theta: 150000,
    type: 'yarn',
    rotaryDim: 64,
    yarn: { factor: 32, betaFast: 32, betaSlow: 1, originalMaxPositionEmbeddings: 4096, attentionFactor: 1.3465735902799727, truncate: false },
  };
  const plain: RopeSpec = { theta: 1000000, type: 'default', rotaryDim: 128 };
  const partial: RopeSpec = { theta: 10000, type: 'default', rotaryDim: 32 };
  it.each([
    ['gpt-oss yarn', yarn, 64, 64, 8],
    ['default', plain, 128, 32, 4],
    ['partial rotary', partial, 64, 4, 4],
  ] as const)('%s', (name, spec, headDim, numHeads, numKvHeads) => {
    const r = rng(headDim * numHeads);
    const tokens = 6;
    const positions = Int32Array.from([0, 1, 17, 4095, 40000, 131071]);
    const q = randomNormal(tokens * numHeads * headDim, r);
    const k = randomNormal(tokens * numKvHeads * headDim, r);
    const table = ropeTable(spec);
    const got = ops().rope({
      q,
      k,
      positions,
      invFreq: table.invFreq,
      attentionFactor: table.attentionFactor,
      numHeads,
      numKvHeads,
      headDim,
      rotaryDim: table.rotaryDim,
    });
    const rq = new Float32Array(q);
    const rk = new Float32Array(k);
    for (let t = 0; t < tokens; t++) {
      for (let h = 0; h < numHeads; h++) applyRope(rq, (t * numHeads + h) * headDim, positions[t], table);
      for (let h = 0; h < numKvHeads; h++) applyRope(rk, (t * numKvHeads + h) * headDim, positions[t], table);
    }
    expectClose(`rope ${name} q`, got.q, rq);
    expectClose(`rope ${name} k`, got.k!, rk);
  });
});

/** y [tokens, rows] by core's linear() (float64 accumulation) on the decoded bf16 weights. */
function gemvRef(w: Float32Array, bias: Float32Array | null, x: Float32Array, rows: number, cols: number, tokens: number): Float32Array {
  const y = new Float32Array(tokens * rows);
  for (let t = 0; t < tokens; t++) linear(x.subarray(t * cols, (t + 1) * cols), w, rows, cols, bias, y.subarray(t * rows, (t + 1) * rows));
  return y;
}

describe.skipIf(skip)('gemv_bf16', () => {
  it.each([
    [2880, 2880, 1, true],
    [2880, 2880, 8, true],
    [4096, 2880, 3, false],
    [512, 2880, 5, true],
    [2880, 4096, 2, true],
    [32, 2880, 4, true],
    [7, 64, 6, false],
    [50021, 2880, 1, false],
  ])('rows %i cols %i tokens %i bias %s', (rows, cols, tokens, withBias) => {
    const r = rng(rows + cols + tokens);
    const w = randomBf16(rows * cols, r, 0.05);
    const bias = withBias ? randomBf16(rows, r, 0.5) : null;
    const x = randomNormal(tokens * cols, r);
    const y = ops().gemvBf16({ w: w.bits, bias: bias?.bits, x, rows, cols, tokens });
    expectClose(`gemv ${rows}x${cols} T=${tokens}`, y, gemvRef(w.values, bias?.values ?? null, x, rows, cols, tokens));
  });

  // 64 tokens or more take the tensor-core GEMM (gemm_bf16: x as bf16 hi + lo parts).
  it.each([
    [5120, 2880, 64, true],
    [2880, 4096, 100, true],
    [300, 264, 130, false],
    [77, 64, 64, true],
  ])('tensor cores: rows %i cols %i tokens %i bias %s', (rows, cols, tokens, withBias) => {
    const r = rng(3 * rows + cols + tokens);
    const w = randomBf16(rows * cols, r, 0.05);
    const bias = withBias ? randomBf16(rows, r, 0.5) : null;
    const x = randomNormal(tokens * cols, r);
    const y = ops().gemvBf16({ w: w.bits, bias: bias?.bits, x, rows, cols, tokens });
    // x enters as bf16 hi + lo (~16 bits): ~1e-5 relative, where the float32 GEMV is ~1e-7.
    expectClose(`gemm ${rows}x${cols} T=${tokens}`, y, gemvRef(w.values, bias?.values ?? null, x, rows, cols, tokens), 5e-5);
  });

  it('tensor cores: a token gets the same bits among 64 or among 100 tokens, and the GEMV\'s within 5e-5', () => {
    const rows = 1000;
    const cols = 2880;
    const r = rng(41);
    const w = randomBf16(rows * cols, r, 0.05);
    const x = randomNormal(100 * cols, r);
    const all = ops().gemvBf16({ w: w.bits, x, rows, cols, tokens: 100 });
    const some = ops().gemvBf16({ w: w.bits, x: x.subarray(36 * cols, 100 * cols), rows, cols, tokens: 64 });
    expectSame('gemm token 75 among 100 vs among 64', all.subarray(75 * rows, 76 * rows), some.subarray(39 * rows, 40 * rows));
    const gemv = ops().gemvBf16({ w: w.bits, x: x.subarray(75 * cols, 76 * cols), rows, cols, tokens: 1 });
    expectClose('gemm vs gemv, token 75', all.subarray(75 * rows, 76 * rows), gemv, 5e-5);
  });

  it('gives each token the same bits whatever the batch (batch invariance)', () => {
    const rows = 2880;
    const cols = 2880;
    const r = rng(99);
    const w = randomBf16(rows * cols, r, 0.05);
    const x = randomNormal(8 * cols, r);
    const all = ops().gemvBf16({ w: w.bits, x, rows, cols, tokens: 8 });
    for (const t of [0, 5]) {
      const one = ops().gemvBf16({ w: w.bits, x: x.subarray(t * cols, (t + 1) * cols), rows, cols, tokens: 1 });
      expectSame(`gemv token ${t} alone vs in a batch of 8`, one, all.subarray(t * rows, (t + 1) * rows));
    }
  });
});


describe.skipIf(skip)('moe_gate_up_mxfp4 / moe_down_mxfp4', () => {
  const cases = [
    ['gpt-oss clamped', 8, 256, 128, 1, 4, CLAMPED, true],
    ['gpt-oss clamped', 8, 256, 128, 3, 4, CLAMPED, true],
    ['swiglu', 16, 512, 256, 8, 4, SWIGLU, false],
    ['swiglu', 8, 256, 96, 5, 2, SWIGLU, false],
    ['gpt-oss-20b shape', 8, 2880, 2880, 2, 4, CLAMPED, true],
    ['gpt-oss-20b shape', 8, 2880, 2880, 8, 4, CLAMPED, true],
  ] as const;

  it.each(cases)('gate/up %s E=%i H=%i I=%i T=%i K=%i', (name, E, H, I, T, K, act, withBias) => {
    const r = rng(E * H + I * T + K);
    const w = randomMxfp4(E, 2 * I, H, r);
    const bias = withBias ? randomBf16(E * 2 * I, r, 0.5) : null;
    const x = randomNormal(T * H, r);
    const ids = randomRouting(T, K, E, r);
    const got = ops().moeGateUp({
      blocks: w.blocks,
      scales: w.scales,
      bias: bias?.bits,
      x,
      expertIds: ids,
      tokens: T,
      topK: K,
      numExperts: E,
      hidden: H,
      inter: I,
      activation: act,
    });
    const ref = new Float64Array(T * K * I);
    const interleaved = act.kind !== 'swiglu';
    for (let t = 0; t < T; t++)
      for (let k = 0; k < K; k++) {
        const e = ids[t * K + k];
        const rowsE = expertRows(w, 2 * I, H, e, 0, 2 * I);
        for (let o = 0; o < I; o++) {
          const gr = interleaved ? 2 * o : o;
          const ur = interleaved ? 2 * o + 1 : I + o;
          const g = dot64(rowsE, gr * H, x, t * H, H) + (bias ? bias.values[e * 2 * I + gr] : 0);
          const u = dot64(rowsE, ur * H, x, t * H, H) + (bias ? bias.values[e * 2 * I + ur] : 0);
          ref[(t * K + k) * I + o] = activate(g, u, act);
        }
      }
    expectClose(`moe gate/up ${name} E=${E} H=${H} I=${I} T=${T} K=${K}`, got, ref);
  });

  it.each(cases)('down + combine %s E=%i H=%i I=%i T=%i K=%i', (name, E, H, I, T, K, _act, withBias) => {
    const r = rng(E * H + I * T + K + 1);
    const w = randomMxfp4(E, H, I, r);
    const bias = withBias ? randomBf16(E * H, r, 0.5) : null;
    const act = randomNormal(T * K * I, r, 2);
    const ids = randomRouting(T, K, E, r);
    const weights = randomF32(T * K, r).map(Math.abs);
    const got = ops().moeDown({
      blocks: w.blocks,
      scales: w.scales,
      bias: bias?.bits,
      act,
      expertIds: ids,
      expertWeights: weights,
      tokens: T,
      topK: K,
      numExperts: E,
      hidden: H,
      inter: I,
    });
    const ref = new Float64Array(T * H);
    for (let t = 0; t < T; t++)
      for (let k = 0; k < K; k++) {
        const e = ids[t * K + k];
        const rowsE = expertRows(w, H, I, e, 0, H);
        for (let h = 0; h < H; h++) {
          const v = dot64(rowsE, h * I, act, (t * K + k) * I, I) + (bias ? bias.values[e * H + h] : 0);
          ref[t * H + h] += weights[t * K + k] * v;
        }
      }
    expectClose(`moe down ${name} E=${E} H=${H} I=${I} T=${T} K=${K}`, got, ref);
  });

  it.each([
    ['gpt-oss clamped, biases', CLAMPED, true, 3],
    ['swiglu', SWIGLU, false, 8],
  ] as const)('gate/up then down = sum of core mlpForward over the routed experts (%s, T=%i)', (name, act, withBias, T) => {
    const E = 8, H = 256, I = 128, K = 4;
    const r = rng(T * 31 + (withBias ? 1 : 0));
    const gu = randomMxfp4(E, 2 * I, H, r);
    const dn = randomMxfp4(E, H, I, r);
    const guBias = withBias ? randomBf16(E * 2 * I, r, 0.5) : null;
    const dnBias = withBias ? randomBf16(E * H, r, 0.5) : null;
    const x = randomNormal(T * H, r);
    const ids = randomRouting(T, K, E, r);
    const weights = randomF32(T * K, r).map(Math.abs);
    const shape = { tokens: T, topK: K, numExperts: E, hidden: H, inter: I };
    const a = ops().moeGateUp({ ...gu, bias: guBias?.bits, x, expertIds: ids, activation: act, ...shape });
    const y = ops().moeDown({ ...dn, bias: dnBias?.bits, act: a, expertIds: ids, expertWeights: weights, ...shape });

    const interleaved = act.kind !== 'swiglu';
    const ref = new Float32Array(T * H);
    const scratch = mlpScratch(I, H);
    for (let t = 0; t < T; t++)
      for (let k = 0; k < K; k++) {
        const e = ids[t * K + k];
        const rowsGu = expertRows(gu, 2 * I, H, e, 0, 2 * I);
        const gate = new Float32Array(I * H);
        const up = new Float32Array(I * H);
        const gateBias = guBias ? new Float32Array(I) : null;
        const upBias = guBias ? new Float32Array(I) : null;
        for (let o = 0; o < I; o++) {
          const gr = interleaved ? 2 * o : o;
          const ur = interleaved ? 2 * o + 1 : I + o;
          gate.set(rowsGu.subarray(gr * H, (gr + 1) * H), o * H);
          up.set(rowsGu.subarray(ur * H, (ur + 1) * H), o * H);
          if (guBias) {
            gateBias![o] = guBias.values[e * 2 * I + gr];
            upBias![o] = guBias.values[e * 2 * I + ur];
          }
        }
        const expert = {
          gate,
          up,
          down: expertRows(dn, H, I, e, 0, H),
          gateBias,
          upBias,
          downBias: dnBias ? dnBias.values.subarray(e * H, (e + 1) * H) : null,
          inter: I,
          hidden: H,
        };
        const ye = mlpForward(x.subarray(t * H, (t + 1) * H), expert, act, scratch);
        for (let h = 0; h < H; h++) ref[t * H + h] += Math.fround(ye[h] * weights[t * K + k]);
      }
    expectClose(`moe gate/up -> down vs mlpForward ${name} T=${T}`, y, ref);
  });

  it('shares one expert between tokens and keeps each token batch invariant', () => {
    const E = 4, H = 256, I = 128, K = 2;
    const r = rng(4242);
    const w = randomMxfp4(E, H, I, r);
    const act = randomNormal(3 * K * I, r);
    const ids = Int32Array.from([1, 2, 2, 1, 1, 3]);
    const weights = Float32Array.from([0.6, 0.4, 0.7, 0.3, 0.5, 0.5]);
    const shape = { tokens: 3, topK: K, numExperts: E, hidden: H, inter: I };
    const all = ops().moeDown({ ...w, act, expertIds: ids, expertWeights: weights, ...shape });
    const one = ops().moeDown({
      ...w,
      act: act.subarray(K * I, 2 * K * I),
      expertIds: ids.subarray(K, 2 * K),
      expertWeights: weights.subarray(K, 2 * K),
      ...shape,
      tokens: 1,
    });
    expectSame('moe down token 1 alone vs with two others', one, all.subarray(H, 2 * H));
  });
});

describe.skipIf(skip)('router', () => {
  const moe = (rule: MoeSpec['rule'], topK: number, numExperts: number, normTopkProb: boolean): MoeSpec => ({
    numExperts,
    topK,
    rule,
    normTopkProb,
    routerBias: true,
    expertBias: false,
    intermediateSize: 0,
    activation: { kind: 'swiglu' },
  });
  it.each([
    ['topk_then_softmax', 32, 2880, 4, false, true, 5],
    ['topk_then_softmax', 8, 4096, 2, false, false, 8],
    ['softmax_then_topk', 128, 2048, 8, true, false, 3],
    ['softmax_then_topk', 128, 2048, 8, false, false, 1],
    ['softmax_then_topk', 60, 1024, 4, true, true, 6],
  ] as const)('%s E=%i H=%i k=%i renormalize=%s bias=%s tokens=%i', (rule, E, H, K, renorm, withBias, T) => {
    const r = rng(E * H + K);
    const w = randomBf16(E * H, r, 0.05);
    const bias = withBias ? randomBf16(E, r, 0.5) : null;
    const x = randomNormal(T * H, r);
    const got = ops().router({ w: w.bits, bias: bias?.bits, x, tokens: T, numExperts: E, hidden: H, topK: K, rule, renormalize: renorm });
    expectClose(`router logits E=${E} H=${H}`, got.logits, gemvRef(w.values, bias?.values ?? null, x, E, H, T));
    // Indices: exactly what the reference routes from the same logits.
    const spec = moe(rule, K, E, renorm);
    const refIds = new Int32Array(T * K);
    const refW = new Float32Array(T * K);
    for (let t = 0; t < T; t++) {
      const rt = route(got.logits.subarray(t * E, (t + 1) * E), spec);
      refIds.set(rt.experts, t * K);
      refW.set(rt.weights, t * K);
    }
    expectSame(`router ${rule} ids`, got.ids, refIds);
    expectClose(`router ${rule} weights`, got.weights, refW);
  });

  it('breaks ties toward the lower expert index', () => {
    const E = 64, K = 6, T = 3;
    const logits = new Float32Array(T * E);
    const r = rng(7);
    for (let i = 0; i < logits.length; i++) logits[i] = Math.round((2 * r() - 1) * 3);  // many equal values
    for (const rule of ['topk_then_softmax', 'softmax_then_topk'] as const) {
      const got = ops().routerTopk({ logits, tokens: T, numExperts: E, topK: K, rule, renormalize: true });
      const refIds = new Int32Array(T * K);
      for (let t = 0; t < T; t++) refIds.set(route(logits.subarray(t * E, (t + 1) * E), moe(rule, K, E, true)).experts, t * K);
      expectSame(`router ties ${rule}`, got.ids, refIds);
    }
  });
});

describe.skipIf(skip)('attention_decode', () => {
  it.each([
    ['gpt-oss sliding + sinks', 64, 8, 64, 128, true, [1, 129, 300, 700], 16],
    ['gpt-oss full + sinks', 64, 8, 64, 0, true, [5, 513, 1000], 32],
    ['qwen3 full', 32, 4, 128, 0, false, [1, 2, 255, 256, 257], 16],
    ['group of 16', 16, 1, 128, 0, false, [600], 64],
    ['mixtral window', 32, 8, 128, 100, false, [99, 100, 101, 450], 16],
  ] as const)('%s heads=%i kv=%i dim=%i window=%i', (name, numHeads, numKvHeads, headDim, window, withSinks, lens, pageSize) => {
    const r = rng(numHeads * headDim + lens.length);
    const S = lens.length;
    const maxPages = Math.ceil(Math.max(...lens) / pageSize);
    const pages = S * maxPages;
    const row = numKvHeads * headDim;
    const kc = randomBf16(pages * pageSize * row, r);
    const vc = randomBf16(pages * pageSize * row, r);
    // Pages handed out in a shuffled order: the block table must be followed.
    const order = Array.from({ length: pages }, (_, i) => i);
    for (let i = pages - 1; i > 0; i--) {
      const j = Math.floor(r() * (i + 1));
      [order[i], order[j]] = [order[j], order[i]];
    }
    const blockTable = Int32Array.from(order);
    const seqLens = Int32Array.from(lens);
    const q = randomNormal(S * numHeads * headDim, r);
    const sinks = withSinks ? randomNormal(numHeads, r, 2) : null;
    const scale = 1 / Math.sqrt(headDim);
    const got = ops().attentionDecode({ q, kCache: kc.bits, vCache: vc.bits, blockTable, seqLens, sinks, numHeads, numKvHeads, headDim, pageSize, window, scale });
    const ref = new Float32Array(S * numHeads * headDim);
    for (let s = 0; s < S; s++) {
      const len = lens[s];
      const keys = new Float32Array(len * row);
      const values = new Float32Array(len * row);
      for (let p = 0; p < len; p++) {
        const page = blockTable[s * maxPages + Math.floor(p / pageSize)];
        const src = (page * pageSize + (p % pageSize)) * row;
        keys.set(kc.values.subarray(src, src + row), p * row);
        values.set(vc.values.subarray(src, src + row), p * row);
      }
      const from = window > 0 ? Math.max(0, len - window) : 0;
      attendOne(q, s * numHeads * headDim, keys, values, from, len - 1, { numHeads, numKvHeads, headDim, scale }, sinks, ref, s * numHeads * headDim, new Float64Array(len));
    }
    expectClose(`attention ${name}`, got, ref);
  });
});

describe.skipIf(skip)('argmax and sampling', () => {
  it('argmax: lowest index among equal maxima, NaN below numbers', () => {
    const V = 201088;
    const rows = 5;
    const r = rng(5);
    const logits = randomNormal(rows * V, r, 3);
    logits[0 * V + 100] = 50; // row 0: a tie, the first one wins
    logits[0 * V + 90000] = 50;
    logits[1 * V + 7] = NaN; // row 1: NaNs are ignored
    logits[1 * V + 200000] = 60;
    logits[1 * V + 3] = NaN;
    for (let i = 2 * V; i < 3 * V; i++) logits[i] = NaN; // row 2: all NaN -> 0
    logits[3 * V + V - 1] = 70; // row 3: the last entry
    const got = ops().argmax({ logits, rows, vocab: V });
    const ref = Int32Array.from({ length: rows }, (_, i) => refArgmax(logits, i * V, V));
    expectSame('argmax ids', got, ref);
  });

  it('philox words and uniforms match rng.ts', () => {
    const r = rng(11);
    const n = 1000;
    const counters = new Uint32Array(4 * n).map(() => Math.floor(r() * 4294967296));
    const seed = 0x1234567890abcn;
    const got = ops().philox({ seed, counters });
    const words = new Uint32Array(4 * n);
    const u = new Float32Array(n);
    const key: [number, number] = [Number(seed & 0xffffffffn), Number(seed >> 32n)];
    for (let i = 0; i < n; i++) {
      const c = counters.subarray(4 * i, 4 * i + 4);
      words.set(philox4x32(c, key), 4 * i);
      u[i] = uniform({ seed, seq: c[1], position: c[0], purpose: c[3] }, c[2]);
    }
    expectSame('philox words', got.words, words);
    expectSame('philox uniforms', got.u, u);
  });

  it.each([
    [201088, 0.7, 3],
    [201088, 1.0, 2],
    [32000, 1.3, 1],
    [1000, 0.5, 4],
  ])('vocab %i temperature %f: the same token as sampleToken', (V, temperature, spread) => {
    const rows = 6;
    const r = rng(V + Math.round(temperature * 10));
    const logits = randomNormal(rows * V, r, spread);
    for (let i = 0; i < V; i += 97) logits[i] = -Infinity; // masked tokens are never drawn
    const seqs = Array.from({ length: rows }, (_, i) => 3 * i + 1);
    const positions = Array.from({ length: rows }, (_, i) => 1000 + 17 * i);
    let agree = 0;
    let total = 0;
    for (const seed of [0, 1, 987654321, 2 ** 40 + 5]) {
      const got = ops().sample({ logits, rows, vocab: V, params: { temperature }, seed, seqs, positions });
      const ref = Int32Array.from({ length: rows }, (_, i) =>
        sampleToken(logits, { temperature }, rngKey(seed, seqs[i], positions[i]), { offset: i * V, length: V }),
      );
      for (let i = 0; i < rows; i++) if (got[i] === ref[i]) agree++;
      total += rows;
      expectSame(`sample V=${V} T=${temperature} seed=${seed}`, got, ref);
    }
    logCheck(`sample V=${V} agreement`, `${agree}/${total}`);
  });
});

describe.skipIf(skip)('errors', () => {
  it('reports out-of-memory with the size asked for and the free memory', () => {
    let caught: unknown;
    try {
      ops().allocate(2 ** 50);
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(MoeflashError);
    const e = caught as MoeflashError & { requestedBytes?: number; freeBytes?: number };
    logCheck('out-of-memory message', e.message);
    expect(e.code).toBe('OUT_OF_MEMORY');
    expect(e.message).toMatch(/asked for .* \(1125899906842624 bytes\)/);
    expect(e.message).toMatch(/free of/);
    expect(e.requestedBytes).toBe(2 ** 50);
  });

  it('rejects bad arguments with INVALID_ARGUMENT naming the argument', () => {
    expect(() => ops().gemvBf16({ w: new Uint16Array(10), x: new Float32Array(8), rows: 2, cols: 8, tokens: 1 })).toThrow(/w has 10 elements; expected 16/);
  });
});
