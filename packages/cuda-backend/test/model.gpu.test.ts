/**
 * The CUDA model against HF transformers' logits (golden fixtures) and the CPU backend: logits at
 * every position, greedy generation, hidden states, KV rollback and out-of-memory at load. Needs
 * a GPU; elsewhere every suite is skipped with the reason printed. Experts load as stored (bf16
 * fixtures stay bf16): the limits are those of exact weights, not of MXFP4 quantize-on-load.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { CpuBackend, MoeflashError, loadModelSpec, openWeights, type LoadedModel } from '@moeflash/core';
import { createCudaBackend, deviceMemory, isCudaAvailable, type CudaModel, type CudaSequenceOutput } from '@moeflash/cuda-backend';

// @ts-expect-error plain ESM module without types
import { TIE, argmax, fixtureNames, fixtureParity } from '../scripts/parity.mjs';

const avail = isCudaAvailable();
if (!avail.ok) console.log(`[cuda] model tests skipped: ${avail.reason}`);
const root = path.join(__dirname, '..', '..', 'core', 'test', 'fixtures', 'golden');
const fixtures: string[] = fixtureNames(root);

async function load(dir: string, backend: 'cpu' | 'cuda', opts: Record<string, unknown> = {}): Promise<LoadedModel> {
  const spec = await loadModelSpec(dir);
  const w = await openWeights(dir);
  try {
    return await (backend === 'cpu' ? new CpuBackend().load(spec, w, opts) : createCudaBackend().load(spec, w, { experts: 'stored', ...opts }));
  } finally {
    await w.close();
  }
}

function relError(a: Float32Array, b: Float32Array): number {
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

describe.skipIf(!avail.ok)('CUDA model parity (golden fixtures)', () => {
  it.each(fixtures)('%s: logits within 1e-2 of HF, top-1 >= 99%, greedy 32 tokens as the CPU', async (name) => {
    const r = await fixtureParity(path.join(root, name), { genTokens: 32, cudaOptions: { experts: 'stored' } });
    for (const [i, s] of r.sequences.entries()) {
      console.log(
        `[cuda] ${name} seq ${i} (len ${s.length}): rel err ${s.relError.toExponential(2)} (limit 1e-2), top-1 ${(100 * s.top1).toFixed(1)}%, up to HF ties < ${TIE} ${(100 * s.top1UpToTies).toFixed(1)}% (limit 99%)`,
      );
      expect(s.nonFinite).toBe(0);
      expect(s.relError).toBeLessThanOrEqual(1e-2);
      expect(s.top1UpToTies).toBeGreaterThan(0.99 - 1e-9);
      expect(s.deviceArgmaxMatches).toBe(1);
    }
    for (const [i, g] of r.greedy.entries()) {
      console.log(`[cuda] ${name} greedy after prompt ${i}: ${g.agree}/${g.of} tokens as the CPU${g.agree < g.of ? ` (CPU top-2 margin at the split ${g.cpuMarginAtSplit})` : ''}`);
      // A split is accepted only at a near tie of the CPU's own top two logits.
      if (g.agree < g.of) expect(g.cpuMarginAtSplit).toBeLessThanOrEqual(2e-2);
    }
    expect(r.graphSteps).toBeGreaterThan(0);
  });
});

describe.skipIf(!avail.ok)('CUDA model steps', () => {
  const dir = () => path.join(root, fixtures.find((f) => f.startsWith('gpt_oss_mxfp4')) ?? fixtures[0]);

  it('hidden states, chunked prefill and batched decode agree with the CPU backend', async () => {
    const cpu = await load(dir(), 'cpu');
    const gpu = await load(dir(), 'cuda', { maxSequences: 4, maxSequenceLength: 64, maxStepTokens: 8 });
    const prompt = [5, 17, 42, 99, 3, 250, 8, 64, 11, 13, 200, 7];
    const layers = [0, cpu.spec.numLayers - 1];
    const a = await cpu.step({ sequences: [{ seq: 1, tokens: prompt, logits: 'all', hiddenLayers: layers }] });
    // maxStepTokens 8 splits this prefill in two calls.
    const b = await gpu.step({ sequences: [{ seq: 1, tokens: prompt, logits: 'all', hiddenLayers: layers }] });
    const e = relError(b.sequences[0].logits, a.sequences[0].logits);
    console.log(`[cuda] chunked prefill logits rel err ${e.toExponential(2)} (limit 1e-2)`);
    expect(e).toBeLessThanOrEqual(1e-2);
    for (const l of layers) {
      const eh = relError(b.sequences[0].hidden!.get(l)!, a.sequences[0].hidden!.get(l)!);
      console.log(`[cuda] hidden layer ${l} rel err ${eh.toExponential(2)} (limit 1e-2)`);
      expect(eh).toBeLessThanOrEqual(1e-2);
    }
    // Rollback: drop the last 4 positions and run them again: same logits as before.
    gpu.truncate(1, prompt.length - 4);
    expect(gpu.length(1)).toBe(prompt.length - 4);
    const c = await gpu.step({ sequences: [{ seq: 1, tokens: prompt.slice(-4), logits: 'last' }] });
    const V = gpu.spec.vocabSize;
    const lastB = b.sequences[0].logits.subarray((prompt.length - 1) * V);
    expect(relError(c.sequences[0].logits, lastB)).toBeLessThanOrEqual(1e-5);
    // Batched decode (a graph of 4 rows padded from 3) equals one sequence at a time.
    const seqs = [2, 3, 4];
    for (const s of seqs) await gpu.step({ sequences: [{ seq: s, tokens: prompt.slice(0, 3 + s), logits: 'none' }] });
    const batched = await gpu.step({ sequences: seqs.map((s) => ({ seq: s, tokens: [s + 1], logits: 'last' as const })) });
    for (const [k, s] of seqs.entries()) {
      gpu.truncate(s, gpu.length(s) - 1);
      const single = await gpu.step({ sequences: [{ seq: s, tokens: [s + 1], logits: 'last' }] });
      const d = relError(batched.sequences[k].logits, single.sequences[0].logits);
      expect(d, `sequence ${s}: batched vs single`).toBeLessThanOrEqual(1e-5);
      expect(argmax(batched.sequences[k].logits)).toBe((single.sequences[0] as CudaSequenceOutput).argmax[0]);
    }
    expect((gpu as CudaModel).stats.graphSteps).toBeGreaterThan(0);
    const m = gpu.memory();
    expect(m.total).toBe(m.weights + m.kvCache + m.activations);
    await gpu.dispose();
    await cpu.dispose();
  });

  it('running out of device memory at load is OUT_OF_MEMORY and leaves nothing allocated', async () => {
    const before = deviceMemory().free;
    let err: unknown;
    try {
      // A KV cache far larger than any GPU.
      await load(dir(), 'cuda', { maxSequences: 1 << 22, maxSequenceLength: 512 });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(MoeflashError);
    expect((err as MoeflashError).code).toBe('OUT_OF_MEMORY');
    const after = deviceMemory().free;
    console.log(`[cuda] free before ${before}, after a failed load ${after}`);
    expect(Math.abs(before - after)).toBeLessThanOrEqual(64 << 20);
    const ok = await load(dir(), 'cuda', { maxSequences: 2, maxSequenceLength: 64 });
    await ok.dispose();
  });
});
