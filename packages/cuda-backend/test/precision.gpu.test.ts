/**
 * Precision 'f32' (float32 KV cache, float32 activations into the MXFP4 experts) against the CPU
 * reference, and the routing trace both backends return (StepSequence.traceRouting).
 *
 * - Every golden fixture, the near-tie ones included (drawn without the router-margin filter): at
 *   f32, every (layer, position) routes as the CPU routes except where the CPU's own top-k margin
 *   is below 1e-5 of the token's largest |router logit|, and every position's logits are within
 *   1e-4 of the CPU's (float32 arithmetic in another order lands near 1e-6).
 * - The bundled tiny coder, whose widths take the tensor-core experts at bf16: at f32 a 20-token
 *   prompt (bf16 flipped a near-tie at token 14 of such a prompt) routes as the CPU, and a
 *   CUDA-graph greedy decode of 40 tokens equals the CPU's token for token.
 * - The trace is what the step did: the experts it reports are route() of the logits it reports.
 * Needs a GPU; skipped with the reason elsewhere.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { argmax, compareRouting, CpuBackend, loadModelSpec, openWeights, route, type LoadedModel, type ModelSpec } from '@moeflash/core';
import { createCudaBackend, isCudaAvailable, type CudaModel } from '@moeflash/cuda-backend';

const avail = isCudaAvailable();
if (!avail.ok) console.log(`[cuda] precision tests skipped: ${avail.reason}`);
const repo = path.join(__dirname, '..', '..', '..');
const golden = path.join(repo, 'packages', 'core', 'test', 'fixtures', 'golden');
const coder = path.join(repo, 'models', 'moeflash-tiny-coder');
const fixtures = fs.existsSync(path.join(golden, 'fixtures.json'))
  ? (JSON.parse(fs.readFileSync(path.join(golden, 'fixtures.json'), 'utf8')).fixtures as string[]).filter((f) =>
      fs.existsSync(path.join(golden, f, 'logits.safetensors')),
    )
  : [];
const NEAR_TIE = 1e-5;

async function both(dir: string, precision: 'f32' | 'bf16', experts: 'stored' | 'auto' = 'stored') {
  const spec = await loadModelSpec(dir);
  const w = await openWeights(dir);
  try {
    const cpu = await new CpuBackend().load(spec, w);
    const gpu = (await createCudaBackend().load(spec, w, { maxSequences: 3, maxSequenceLength: 160, maxStepTokens: 64, precision, experts })) as CudaModel;
    return { spec, cpu, gpu };
  } finally {
    await w.close();
  }
}

async function traced(m: LoadedModel, seq: number, tokens: number[]) {
  const r = await m.step({ sequences: [{ seq, tokens, logits: 'all', traceRouting: true }] });
  m.release(seq);
  return r.sequences[0] as { logits: Float32Array; routing: NonNullable<(typeof r.sequences)[0]['routing']> };
}

function dims(spec: ModelSpec) {
  return { vocab: spec.vocabSize, numExperts: spec.moe.numExperts, topK: spec.moe.topK };
}

describe.skipIf(!avail.ok)('precision f32 against the CPU reference', () => {
  it('has the near-tie fixtures', () => {
    expect(fixtures).toEqual(expect.arrayContaining(['gpt_oss_neartie', 'qwen3_moe_neartie']));
  });

  for (const name of fixtures) {
    it(`${name}: routing as the CPU's except at its own near-ties, logits within 1e-4 at every position`, async () => {
      const dir = path.join(golden, name);
      const { sequences } = JSON.parse(fs.readFileSync(path.join(dir, 'input.json'), 'utf8')) as { sequences: number[][] };
      const { spec, cpu, gpu } = await both(dir, 'f32');
      try {
        expect(gpu.precision).toBe('f32');
        for (const [i, tokens] of sequences.entries()) {
          const c = compareRouting(await traced(cpu, i, tokens), await traced(gpu, i, tokens), dims(spec), NEAR_TIE);
          const unexplained = c.differences.filter((d) => d.relativeMargin >= NEAR_TIE);
          expect(unexplained, `sequence ${i}: ${JSON.stringify(unexplained.slice(0, 2))}`).toEqual([]);
          expect(Math.max(...c.positionErrors), `sequence ${i}`).toBeLessThan(1e-4);
          expect(c.top1).toBe(1);
        }
      } finally {
        await gpu.dispose();
        await cpu.dispose();
      }
    });
  }

  it('tiny coder at f32: a 20-token prompt routes as the CPU; greedy decode (graphs) equals the CPU', async () => {
    const prompt = [12, 400, 33, 1017, 5, 77, 2048, 9, 310, 61, 8, 1500, 3, 4000, 15, 2, 900, 18, 1234, 56];
    const { spec, cpu, gpu } = await both(coder, 'f32', 'auto');
    try {
      expect(gpu.expertFormat).toBe('mxfp4');
      const c = compareRouting(await traced(cpu, 0, prompt), await traced(gpu, 0, prompt), dims(spec), NEAR_TIE);
      expect(c.differences.filter((d) => d.relativeMargin >= NEAR_TIE)).toEqual([]);
      expect(Math.max(...c.positionErrors)).toBeLessThan(1e-4);
      const V = spec.vocabSize;
      const gen = async (m: LoadedModel) => {
        const out: number[] = [];
        let r = await m.step({ sequences: [{ seq: 5, tokens: prompt, logits: 'last' }] });
        for (let i = 0; i < 40; i++) {
          const t = argmax(r.sequences[0].logits.subarray(0, V));
          out.push(t);
          r = await m.step({ sequences: [{ seq: 5, tokens: [t], logits: 'last' }] });
        }
        m.release(5);
        return out;
      };
      expect(await gen(gpu)).toEqual(await gen(cpu));
      expect(gpu.stats.graphSteps).toBeGreaterThan(0);
    } finally {
      await gpu.dispose();
      await cpu.dispose();
    }
  });

  it('the f32 cache holds twice the bytes of the bf16 one for the same pages', async () => {
    const spec = await loadModelSpec(coder);
    const w = await openWeights(coder);
    try {
      const opts = { maxSequences: 2, maxSequenceLength: 64, kvCache: { pages: 16 } };
      const a = (await createCudaBackend().load(spec, w, { ...opts, precision: 'f32' })) as CudaModel;
      const b = (await createCudaBackend().load(spec, w, { ...opts, precision: 'bf16' })) as CudaModel;
      // Both hold the scratch page beside the 16.
      expect(a.memory().kvCache).toBe(2 * b.memory().kvCache);
      expect([a.precision, b.precision]).toEqual(['f32', 'bf16']);
      await a.dispose();
      await b.dispose();
    } finally {
      await w.close();
    }
  });
});

describe.skipIf(!avail.ok)('routing trace on the CUDA backend', () => {
  for (const precision of ['bf16', 'f32'] as const) {
    it(`reports the experts its own logits route to (${precision}; tensor-core experts at bf16)`, async () => {
      const { spec, cpu, gpu } = await both(coder, precision, 'auto');
      try {
        const tokens = [5, 900, 31, 2000, 7, 7, 64, 1200, 3];
        const t = (await traced(gpu, 1, tokens)).routing;
        const E = spec.moe.numExperts, K = spec.moe.topK;
        for (let l = 0; l < spec.numLayers; l++) {
          for (let p = 0; p < tokens.length; p++) {
            const want = route(t.logits[l].subarray(p * E, (p + 1) * E), spec.moe).experts;
            expect(Array.from(t.experts[l].subarray(p * K, (p + 1) * K)), `layer ${l} position ${p}`).toEqual(Array.from(want));
          }
        }
        // A traced step is an ordinary step: the same logits as without the trace.
        const plain = await gpu.step({ sequences: [{ seq: 2, tokens, logits: 'all' }] });
        expect(Array.from(plain.sequences[0].logits)).toEqual(Array.from((await traced(gpu, 3, tokens)).logits));
      } finally {
        await gpu.dispose();
        await cpu.dispose();
      }
    });
  }
});
