/**
 * DFlash with the drafter on the device (CudaModel.attachDrafter, Model.round): one native call a
 * round drafts, verifies and accepts. Lossless means the emitted tokens are the target's own
 * greedy tokens, whatever the drafter proposes:
 *  - through the engine on the bundled pair, every block size 1..16, against plain CUDA greedy;
 *  - with forced proposals that are always right (the target's own continuation: every round
 *    keeps all B) and always wrong (every round keeps none), several sequences a round beside a
 *    plain decode;
 *  - the drafter itself: its acceptance on the device against the host drafter's (CPU backend,
 *    speculative's DflashDraft) on the same prompts.
 * Needs a GPU; skipped with the reason elsewhere.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { argmax, createEngine, loadModelSpec, openWeights, type LoadedModel } from '@moeflash/core';
import { createCudaBackend, isCudaAvailable, type CudaModel } from '@moeflash/cuda-backend';
import { deviceDrafterSpec, loadDflashConfig } from '@moeflash/speculative';

const avail = isCudaAvailable();
if (!avail.ok) console.log(`[cuda] device DFlash tests skipped: ${avail.reason}`);
const repo = path.join(__dirname, '..', '..', '..');
const target = path.join(repo, 'models', 'moeflash-tiny-coder');
const draft = path.join(repo, 'models', 'moeflash-tiny-coder-dflash');
const PROMPTS = ['def fibonacci(n):', 'import os\n\ndef list_files(path):', 'class Stack:\n    def __init__(self):'];
const GEN = 40;

async function loadWithDrafter(): Promise<CudaModel> {
  const spec = await loadModelSpec(target);
  const w = await openWeights(target);
  let m: CudaModel;
  try {
    m = (await createCudaBackend().load(spec, w, { maxSequences: 4, maxSequenceLength: 256, maxStepTokens: 128 })) as CudaModel;
  } finally {
    await w.close();
  }
  const cfg = await loadDflashConfig(draft);
  const src = await openWeights(draft);
  try {
    await m.attachDrafter(deviceDrafterSpec(cfg, src, spec));
  } finally {
    await src.close();
  }
  return m;
}

/** Greedy tokens after `prompt` with one-token steps (the reference). */
async function plainGreedy(m: LoadedModel, seq: number, prompt: number[], n: number): Promise<number[]> {
  const V = m.spec.vocabSize;
  let r = await m.step({ sequences: [{ seq, tokens: prompt, logits: 'last' }] });
  const out: number[] = [];
  while (out.length < n) {
    const t = argmax(r.sequences[0].logits.subarray(0, V));
    out.push(t);
    r = await m.step({ sequences: [{ seq, tokens: [t], logits: 'last' }] });
  }
  m.release(seq);
  return out;
}

describe.skipIf(!avail.ok)('DFlash on the device', () => {
  it('engine: speculative greedy output equals plain greedy output at every block size 1..16', async () => {
    const plain = await createEngine({ model: target, backend: createCudaBackend(), log: () => {} });
    const want: string[] = [];
    for (const p of PROMPTS) want.push((await plain.generate(p, { maxTokens: GEN, temperature: 0 }).result).text);
    await plain.close();
    const rows: string[] = [];
    for (let b = 1; b <= 16; b++) {
      const spec = await createEngine({ model: target, backend: createCudaBackend(), log: () => {}, speculative: { method: 'dflash', draft, blockSize: b, adaptive: false } });
      let rounds = 0, accepted = 0;
      for (const [i, p] of PROMPTS.entries()) {
        const r = await spec.generate(p, { maxTokens: GEN, temperature: 0 }).result;
        expect(r.text, `block ${b}, prompt ${i}`).toBe(want[i]);
        expect(r.speculation?.method).toBe('dflash');
        rounds += r.speculation!.rounds;
        accepted += r.speculation!.acceptedTokens;
      }
      rows.push(`B=${b}: ${(((accepted + rounds) / rounds)).toFixed(2)} tokens a round`);
      await spec.close();
    }
    // The default on the device: the policy picks B in 0..16 from the rounds' measured cost.
    const adaptive = await createEngine({ model: target, backend: createCudaBackend(), log: () => {}, speculative: { method: 'dflash', draft, blockSize: 16 } });
    for (const [i, p] of PROMPTS.entries()) expect((await adaptive.generate(p, { maxTokens: GEN, temperature: 0 }).result).text, `adaptive, prompt ${i}`).toBe(want[i]);
    await adaptive.close();
    console.log(`[dflash device] ${rows.join('; ')}`);
  });

  it('forced drafts: always right keeps every draft, always wrong keeps none; both emit the greedy tokens; rounds share a step with a plain decode', async () => {
    const m = await loadWithDrafter();
    try {
      const V = m.spec.vocabSize;
      const prompts = [[5, 100, 31, 900, 7], [44, 12, 3000, 18, 2, 2, 9], [1, 2, 3]];
      const want = [] as number[][];
      for (const [i, p] of prompts.entries()) want.push(await plainGreedy(m, 50 + i, p, GEN));
      for (const mode of ['right', 'wrong'] as const) {
        // Prefill all three (feeding the drafter), then rounds for 0 and 1, plain decodes for 2.
        const pre = await m.step({ sequences: prompts.map((tokens, i) => ({ seq: i, tokens, logits: 'none' as const, absorb: true, sample: { params: { temperature: 0 }, key: { seed: 0, seq: i, position: tokens.length } } })) });
        const got = pre.sequences.map((s) => [s.sampled!]);
        got.forEach((g, i) => expect(g[0]).toBe(want[i][0]));
        const B = 5;
        while (got[0].length < GEN || got[1].length < GEN) {
          const seqs = [0, 1].filter((i) => got[i].length < GEN);
          const plan = seqs.map((i) => {
            const n = got[i].length;
            const next = want[i].slice(n, n + B);
            while (next.length < B) next.push(0);
            const forced = mode === 'right' ? next : next.map((t) => (t + 1) % V);
            return { seq: i, tokens: [got[i][n - 1]], logits: 'none' as const, absorb: true, speculate: { blockSize: B, forced } };
          });
          const plainRow = got[2].length < GEN ? [{ seq: 2, tokens: [got[2][got[2].length - 1]], logits: 'none' as const, absorb: true, sample: { params: { temperature: 0 }, key: { seed: 0, seq: 2, position: m.length(2) + 1 } } }] : [];
          const r = await m.step({ sequences: [...plan, ...plainRow] });
          seqs.forEach((i, k) => {
            const sp = r.sequences[k].speculation!;
            const room = want[i].length - got[i].length;
            if (mode === 'wrong') expect(sp.accepted).toBe(0);
            else if (room > B) expect(sp.accepted).toBe(B);
            got[i].push(...sp.emitted);
            expect(m.length(i)).toBe(prompts[i].length + got[i].length - 1);
          });
          if (plainRow.length) got[2].push(r.sequences[seqs.length].sampled!);
        }
        for (let i = 0; i < 3; i++) expect(got[i].slice(0, GEN), `${mode}, sequence ${i}`).toEqual(want[i]);
        for (let i = 0; i < 3; i++) m.release(i);
      }
    } finally {
      await m.dispose();
    }
  });

  it('the device drafter accepts what the host drafter accepts on the same prompts (bundled pair)', async () => {
    const run = async (device: boolean) => {
      const e = await createEngine({ model: target, backend: device ? createCudaBackend() : 'cpu', log: () => {}, speculative: { method: 'dflash', draft, blockSize: 8, adaptive: false } });
      const stats = [];
      for (const p of PROMPTS) stats.push((await e.generate(p, { maxTokens: GEN, temperature: 0 }).result).speculation!);
      await e.close();
      return stats;
    };
    const d = await run(true);
    const h = await run(false);
    const sum = (s: typeof d) => s.reduce((n, x) => n + x.acceptedTokens, 0);
    console.log(`[dflash device] accepted drafts: device ${sum(d)}, host ${sum(h)} (${d.map((x) => x.rounds).join(',')} vs ${h.map((x) => x.rounds).join(',')} rounds)`);
    // The device keeps float32 activations like the host; only rare argmax near-ties may differ.
    expect(Math.abs(sum(d) - sum(h))).toBeLessThanOrEqual(Math.max(2, 0.05 * sum(h)));
  });

  it('memory() reports the drafter; a second attach and a round without a drafter fail clearly', async () => {
    const m = await loadWithDrafter();
    try {
      expect(m.memory().drafter).toBeGreaterThan(0);
      const cfg = await loadDflashConfig(draft);
      const src = await openWeights(draft);
      await expect(m.attachDrafter(deviceDrafterSpec(cfg, src, m.spec))).rejects.toThrow(/already attached/);
      await src.close();
    } finally {
      await m.dispose();
    }
    const spec = await loadModelSpec(target);
    const w = await openWeights(target);
    const bare = (await createCudaBackend().load(spec, w, { maxSequences: 1, maxSequenceLength: 64 })) as CudaModel;
    await w.close();
    await expect(bare.step({ sequences: [{ seq: 0, tokens: [1], logits: 'none', speculate: { blockSize: 4 } }] })).rejects.toThrow(/needs a drafter/);
    await bare.dispose();
  });
});
