/**
 * The bundled moeflash-tiny-coder (qwen3_moe, MXFP4 experts, hidden 256, expert width 192) is the
 * one real checkpoint whose shapes take the tensor-core MoE path (hidden and expert width multiples
 * of 64; the golden fixtures are smaller and take the per-token kernels). Against the CPU backend
 * on the same weights: prefill logits, then decode steps teacher-forced with the CPU's greedy
 * tokens, at one and at three sequences a step, so that every decode feature of that path runs:
 * the MoE plan and top-k built inside the experts' launch, the RMSNorm fused into the q/k/v and
 * router projections, and CUDA-graph replay. Needs a GPU; skipped with the reason elsewhere.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { CpuBackend, loadModelSpec, openWeights } from '@moeflash/core';
import { createCudaBackend, isCudaAvailable, type CudaModel } from '@moeflash/cuda-backend';

const avail = isCudaAvailable();
if (!avail.ok) console.log(`[cuda] tensor-core model tests skipped: ${avail.reason}`);
const dir = path.join(__dirname, '..', '..', '..', 'models', 'moeflash-tiny-coder');

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

const PROMPTS = [
  [12, 400, 33, 1017, 5, 77, 2048, 9, 310, 61, 8, 1500],
  [7, 7, 7, 300, 301, 302, 303, 4000, 15, 2],
  [900, 18, 1234, 56, 3000, 44, 100, 101, 102, 2500, 3, 19, 28, 37, 46, 55, 64, 73, 82, 91],
];
const STEPS = 24;

describe.skipIf(!avail.ok)('CUDA tensor-core path on the bundled tiny coder', () => {
  it('prefill and decode logits match the CPU backend (1 and 3 sequences a step)', async () => {
    const spec = await loadModelSpec(dir);
    const w = await openWeights(dir);
    try {
      const cpu = await new CpuBackend().load(spec, w);
      const gpu = (await createCudaBackend().load(spec, w, { maxSequences: 4, maxSequenceLength: 128, maxStepTokens: 32 })) as CudaModel;
      expect(gpu.expertFormat).toBe('mxfp4');
      const V = spec.vocabSize;
      let worstPrefill = 0;
      const next: number[] = [];
      for (let s = 0; s < PROMPTS.length; s++) {
        const a = await cpu.step({ sequences: [{ seq: s, tokens: PROMPTS[s], logits: 'all' }] });
        const b = await gpu.step({ sequences: [{ seq: s, tokens: PROMPTS[s], logits: 'all' }] });
        worstPrefill = Math.max(worstPrefill, relError(b.sequences[0].logits, a.sequences[0].logits));
        next.push(argmax(a.sequences[0].logits.subarray((PROMPTS[s].length - 1) * V)));
      }
      console.log(`[cuda] tiny coder prefill logits worst rel err ${worstPrefill.toExponential(2)} (limit 1e-2)`);
      expect(worstPrefill).toBeLessThanOrEqual(1e-2);

      let worst1 = 0;
      let worst3 = 0;
      let agree = 0;
      let total = 0;
      for (let i = 0; i < STEPS; i++) {
        // Sequence 0 alone on even steps (batch 1), all three together on odd ones (batch 3).
        const seqs = i % 2 === 0 ? [0] : [0, 1, 2];
        const plan = { sequences: seqs.map((s) => ({ seq: s, tokens: [next[s]], logits: 'last' as const })) };
        const c = await cpu.step(plan);
        const g = await gpu.step(plan);
        for (let j = 0; j < seqs.length; j++) {
          const e = relError(g.sequences[j].logits, c.sequences[j].logits);
          if (seqs.length === 1) worst1 = Math.max(worst1, e);
          else worst3 = Math.max(worst3, e);
          agree += argmax(g.sequences[j].logits) === argmax(c.sequences[j].logits) ? 1 : 0;
          total++;
          next[seqs[j]] = argmax(c.sequences[j].logits);
        }
      }
      console.log(
        `[cuda] tiny coder decode logits worst rel err ${worst1.toExponential(2)} (batch 1), ${worst3.toExponential(2)} (batch 3); top-1 ${agree}/${total}`,
      );
      expect(worst1).toBeLessThanOrEqual(1e-2);
      expect(worst3).toBeLessThanOrEqual(1e-2);
      expect(agree / total).toBeGreaterThanOrEqual(0.95);
      expect(gpu.stats.graphSteps).toBeGreaterThan(0);
      await gpu.dispose();
      await cpu.dispose();
    } finally {
      await w.close();
    }
  });
});
