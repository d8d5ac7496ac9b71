/**
 * The engine's path for speculation that runs on the backend (RequestSpeculator.onDevice,
 * StepSequence.speculate/absorb, the scheduler's deviceRound), on the CPU: `RoundModel` gives the
 * CPU backend the two calls the CUDA backend has (attachDrafter, a round in one step), written
 * with the reference pieces (DflashDraft, verifyRound's greedy rule), so that CI checks the
 * engine's side of it: output equal to plain greedy, the cache kept as the round leaves it, the
 * drafter fed by prefill chunks and plain steps, statistics. The CUDA backend's own round is
 * checked against the same expectations on the GPU host (dflash-device.gpu.test.ts).
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  argmax,
  createEngine,
  loadModel,
  type DeviceDrafterInfo,
  type DeviceDrafterSpec,
  type LoadedModel,
  type SequenceOutput,
  type StepPlan,
  type StepResult,
} from '@moeflash/core';
import { DflashDraft, loadDflashConfig, loadDflashWeights, type DflashKvCache } from '@moeflash/speculative';

const repo = path.join(__dirname, '..', '..', '..');
const target = path.join(repo, 'models', 'moeflash-tiny-coder');
const draft = path.join(repo, 'models', 'moeflash-tiny-coder-dflash');

/** The CPU backend plus a drafter it runs itself, the round done with the reference modules. */
async function roundModel(): Promise<LoadedModel & { rounds: number }> {
  const h = await loadModel({ model: target, backend: 'cpu' });
  const inner = h.model;
  const cfg = await loadDflashConfig(draft);
  const drafter = new DflashDraft(cfg, await loadDflashWeights(cfg, draft, target, h.spec), { hiddenSize: h.spec.hiddenSize, numLayers: h.spec.numLayers, rmsNormEps: h.spec.rmsNormEps });
  const caches = new Map<number, DflashKvCache>();
  const cacheOf = (seq: number) => {
    let c = caches.get(seq);
    if (!c) caches.set(seq, (c = drafter.newCache()));
    return c;
  };
  const layers = [...new Set(cfg.targetLayerIds)];
  const V = h.spec.vocabSize;
  let attached = false;
  const m = {
    spec: h.spec,
    sampling: inner.sampling,
    rounds: 0,
    length: (s: number) => inner.length(s),
    truncate(s: number, n: number) {
      inner.truncate(s, n);
      const c = caches.get(s);
      if (c && c.length > n) c.truncate(n);
    },
    release(s: number) {
      inner.release(s);
      caches.delete(s);
    },
    memory: () => inner.memory(),
    dispose: () => inner.dispose(),
    async attachDrafter(spec: DeviceDrafterSpec): Promise<DeviceDrafterInfo> {
      expect(spec.method).toBe('dflash');
      expect(spec.targetLayerIds).toEqual(cfg.targetLayerIds);
      attached = true;
      return { bytes: 1, kvCacheBytes: 0 };
    },
    async step(plan: StepPlan): Promise<StepResult> {
      const out: SequenceOutput[] = [];
      for (const s of plan.sequences) {
        if ((s.absorb || s.speculate) && !attached) throw new Error('absorb/speculate before attachDrafter');
        const L = inner.length(s.seq);
        const cache = cacheOf(s.seq);
        if (s.absorb) expect(cache.length).toBe(L);
        if (!s.speculate) {
          const r = (await inner.step({ sequences: [{ ...s, hiddenLayers: s.absorb ? layers : undefined }] })).sequences[0];
          if (s.absorb) drafter.absorb(cache, drafter.features(r.hidden, 0, s.tokens.length), s.tokens.length);
          out.push(r);
          continue;
        }
        const B = s.speculate.blockSize;
        const dl = drafter.block(cache, s.tokens[0], B);
        const drafts = s.speculate.forced ?? Array.from({ length: B }, (_, i) => argmax(dl, i * V, V));
        const r = (await inner.step({ sequences: [{ seq: s.seq, tokens: [s.tokens[0], ...drafts], logits: 'all', hiddenLayers: layers }] })).sequences[0];
        let a = 0;
        while (a < B && drafts[a] === argmax(r.logits, a * V, V)) a++;
        const emitted = [...drafts.slice(0, a), argmax(r.logits, a * V, V)];
        inner.truncate(s.seq, L + a + 1);
        drafter.absorb(cache, drafter.features(r.hidden, 0, a + 1), a + 1);
        m.rounds++;
        out.push({ seq: s.seq, logits: new Float32Array(0), rows: 0, speculation: { emitted, accepted: a, blockSize: B } });
      }
      return { sequences: out };
    },
  };
  return m;
}

describe('speculation on the backend (engine path, CPU reference round)', () => {
  it('greedy output equals plain greedy at block sizes 1, 4 and 16, the drafter fed by chunked prefill; sampled requests decode plainly', async () => {
    const prompts = ['def fibonacci(n):', 'import os\n\ndef walk(path):\n    for root, dirs, files in os.walk(path):'];
    const plain = await createEngine({ model: target, backend: 'cpu', log: () => {} });
    const want: string[] = [];
    for (const p of prompts) want.push((await plain.generate(p, { maxTokens: 40, temperature: 0 }).result).text);
    await plain.close();
    for (const blockSize of [1, 4, 16]) {
      const m = await roundModel();
      const backend = { name: 'cpu-rounds', devices: () => [], load: async () => m };
      const e = await createEngine({ model: target, backend, log: () => {}, prefillChunk: 8, speculative: { method: 'dflash', draft, blockSize } });
      for (const [i, p] of prompts.entries()) {
        const r = await e.generate(p, { maxTokens: 40, temperature: 0 }).result;
        expect(r.text, `block ${blockSize}, prompt ${i}`).toBe(want[i]);
        expect(r.speculation?.rounds).toBeGreaterThan(0);
        expect(r.speculation!.acceptedTokens).toBeGreaterThanOrEqual(0);
      }
      expect(m.rounds).toBeGreaterThan(0);
      const before = m.rounds;
      const sampled = await e.generate(prompts[0], { maxTokens: 8, temperature: 0.8, seed: 3 }).result;
      expect(sampled.speculation).toBeUndefined();
      expect(m.rounds).toBe(before);
      await e.close();
    }
  });
});
