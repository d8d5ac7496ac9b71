/**
 * The CUDA model on FP8 checkpoints (attention and dense MLP weights E4M3 with block scales, made
 * in memory from the golden fixtures) against the CPU backend on the same weights: the FP8
 * projections run through gemv_fp8 instead of being upcast to bf16 at load. Prefill and decode
 * steps (the latter replayed from CUDA graphs) must give the CPU's logits within the 1e-2 of the
 * other CUDA-vs-CPU checks. Needs a GPU; elsewhere the suite is skipped with the reason printed.
 *
 * The device keeps K and V in bf16, the CPU in float32: a case whose CPU routing has a near-tie
 * fails here with no fault in the FP8 path. fp8-dense-cases.test.ts measures on the CPU what that
 * rounding alone does to these cases (it gave the H100's errors to three digits) and keeps them
 * clear of such ties.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { CpuBackend, loadModelSpec, openWeights } from '@moeflash/core';
import { createCudaBackend, isCudaAvailable, type CudaModel } from '@moeflash/cuda-backend';

import { FP8_DECODE_STEPS, FP8_MODEL_CASES, FP8_PROMPT, fp8Checkpoint } from './fp8-source.js';

const avail = isCudaAvailable();
if (!avail.ok) console.log(`[cuda] FP8 dense model tests skipped: ${avail.reason}`);
const root = path.join(__dirname, '..', '..', 'core', 'test', 'fixtures', 'golden');

function relError(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    if (!Number.isFinite(a[i])) return Infinity;
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

function argmax(v: Float32Array): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i] > v[best]) best = i;
  return best;
}

describe.skipIf(!avail.ok)('CUDA model with FP8 dense weights', () => {
  it.each(FP8_MODEL_CASES)('%s, blocks %j: logits as the CPU backend', async (name, block) => {
    const dir = path.join(root, name);
    const w = await openWeights(dir);
    try {
      const fp = await fp8Checkpoint(await loadModelSpec(dir), w, block);
      const cpu = await new CpuBackend().load(fp.spec, fp.source);
      const gpu = (await createCudaBackend().load(fp.spec, fp.source, {
        experts: 'stored', // the CPU's exact experts: the FP8 projections are what is compared
        maxSequences: 2,
        maxSequenceLength: 64,
        maxStepTokens: 16,
      })) as CudaModel;
      expect(gpu.fp8Matrices).toBe(fp.fp8.length);
      const V = fp.spec.vocabSize;
      // 20 tokens in steps of at most 16: gemv_fp8 runs 8 tokens a launch, plus a remainder.
      const prompt = FP8_PROMPT;
      const a = await cpu.step({ sequences: [{ seq: 1, tokens: prompt, logits: 'all' }] });
      const b = await gpu.step({ sequences: [{ seq: 1, tokens: prompt, logits: 'all' }] });
      const e = relError(b.sequences[0].logits, a.sequences[0].logits);
      console.log(`[cuda] ${name} FP8 ${block.join('x')}: prefill logits rel err ${e.toExponential(2)} (limit 1e-2)`);
      expect(e).toBeLessThanOrEqual(1e-2);
      // Greedy decode on the CPU's tokens: one-token steps, replayed from CUDA graphs.
      let next = argmax(a.sequences[0].logits.subarray((prompt.length - 1) * V));
      let worst = 0;
      for (let i = 0; i < FP8_DECODE_STEPS; i++) {
        const c = await cpu.step({ sequences: [{ seq: 1, tokens: [next], logits: 'last' }] });
        const g = await gpu.step({ sequences: [{ seq: 1, tokens: [next], logits: 'last' }] });
        worst = Math.max(worst, relError(g.sequences[0].logits, c.sequences[0].logits));
        next = argmax(c.sequences[0].logits);
      }
      console.log(`[cuda] ${name} FP8 ${block.join('x')}: decode logits worst rel err ${worst.toExponential(2)} (limit 1e-2)`);
      expect(worst).toBeLessThanOrEqual(1e-2);
      expect(gpu.stats.graphSteps).toBeGreaterThan(0);
      await gpu.dispose();
      await cpu.dispose();
    } finally {
      await w.close();
    }
  });
});
