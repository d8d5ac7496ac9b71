/**
 * Decode attention with the q/k/v epilogue folded in (kernels/attention_fused.cu) on the bundled
 * tiny coder (qwen3_moe: q/k norms, 4 query heads over 2 kv heads, head_dim 64), at a short context
 * (one split: output written directly) and at a long one (1400+ positions: two splits merged by
 * the last block). Two checks a decode step:
 *  - against the CPU backend, per logits row (1e-2 relative, as the other CUDA-vs-CPU checks);
 *  - against the three-launch path (qkv_prepare + split + combine, MOEFLASH_ATTENTION_FUSED=0) on
 *    the same device state: the step is run, the sequences are truncated back, and the step is run
 *    again the other way. Both paths read the same bf16 cache and differ only in summation order.
 * Needs a GPU; skipped with the reason elsewhere.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { argmax, CpuBackend, loadModelSpec, openWeights } from '@moeflash/core';
import { createCudaBackend, isCudaAvailable, type CudaModel } from '@moeflash/cuda-backend';

import { relError, rng } from './helpers.js';

const avail = isCudaAvailable();
if (!avail.ok) console.log(`[cuda] fused attention tests skipped: ${avail.reason}`);
const dir = path.join(__dirname, '..', '..', '..', 'models', 'moeflash-tiny-coder');

describe.skipIf(!avail.ok)('fused decode attention (q/k/v epilogue + attention in one launch)', () => {
  it('matches the CPU and the three-launch path at one split and across two merged splits', async () => {
    const spec = await loadModelSpec(dir);
    const w = await openWeights(dir);
    const r = rng(7);
    const prompts = [
      Array.from({ length: 1400 }, () => Math.floor(r() * 4000)),
      Array.from({ length: 20 }, () => Math.floor(r() * 4000)),
    ];
    const saved = process.env.MOEFLASH_ATTENTION_FUSED;
    try {
      const cpu = await new CpuBackend().load(spec, w);
      const gpu = (await createCudaBackend().load(spec, w, { maxSequences: 2, maxSequenceLength: 1536, maxStepTokens: 256, precision: 'bf16' })) as CudaModel;
      const V = spec.vocabSize;
      const next: number[] = [];
      for (let s = 0; s < prompts.length; s++) {
        const a = await cpu.step({ sequences: [{ seq: s, tokens: prompts[s], logits: 'last' }] });
        await gpu.step({ sequences: [{ seq: s, tokens: prompts[s], logits: 'last' }] });
        next.push(argmax(a.sequences[0].logits.subarray(a.sequences[0].logits.length - V)));
      }
      const vsCpu: number[] = [];
      const vsUnfused: number[] = [];
      let agree = 0;
      for (let i = 0; i < 8; i++) {
        const plan = { sequences: [0, 1].map((s) => ({ seq: s, tokens: [next[s]], logits: 'last' as const })) };
        const c = await cpu.step(plan);
        delete process.env.MOEFLASH_ATTENTION_FUSED;
        gpu.dropGraphs();
        const fused = await gpu.step(plan);
        for (const s of [0, 1]) gpu.truncate(s, gpu.length(s) - 1);
        process.env.MOEFLASH_ATTENTION_FUSED = '0';
        gpu.dropGraphs();
        const unfused = await gpu.step(plan);
        for (let j = 0; j < 2; j++) {
          vsCpu.push(relError(fused.sequences[j].logits, c.sequences[j].logits));
          vsUnfused.push(relError(fused.sequences[j].logits, unfused.sequences[j].logits));
          agree += argmax(fused.sequences[j].logits) === argmax(c.sequences[j].logits) ? 1 : 0;
          next[j] = argmax(c.sequences[j].logits);
        }
      }
      const worst = (a: number[]) => Math.max(...a);
      console.log(
        `[cuda] fused decode attention (contexts 1400-1408 and 20-28): vs CPU worst ${worst(vsCpu).toExponential(2)}, ` +
          `vs three-launch path worst ${worst(vsUnfused).toExponential(2)}, top-1 ${agree}/${vsCpu.length}`,
      );
      expect(vsCpu.filter((e) => e <= 1e-2).length / vsCpu.length).toBeGreaterThanOrEqual(0.9);
      expect(worst(vsUnfused)).toBeLessThan(2e-3);
      expect(agree / vsCpu.length).toBeGreaterThanOrEqual(0.9);
      expect(gpu.stats.graphSteps).toBeGreaterThan(0);
      await gpu.dispose();
      await cpu.dispose();
    } finally {
      if (saved === undefined) delete process.env.MOEFLASH_ATTENTION_FUSED;
      else process.env.MOEFLASH_ATTENTION_FUSED = saved;
      await w.close();
    }
  });
});
