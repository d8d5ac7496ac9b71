import { beforeAll, describe, expect, it } from 'vitest';
import { CpuModel, loadModelSpec, loadModelWeights, openWeights, type ModelSpec, type ModelWeights, type StepSequence } from '@moeflash/core';
import { tinyModel } from './helpers.js';

const same = (a: Float32Array, b: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));

/** A deterministic pseudo-random source for plans. */
function lcg(seed: number) {
  let s = seed;
  return (n: number) => {
    s = (s * 1103515245 + 12345) % 2147483648;
    return s % n;
  };
}

for (const family of ['qwen3_moe', 'gpt_oss'] as const) {
  describe(`${family}: paged KV cache of the CPU backend`, () => {
    let spec: ModelSpec;
    let w: ModelWeights;
    const model = (pageSize: number, pages = 512, prefixCaching = true, simd = true) => new CpuModel(spec, w, { pageSize, pages, prefixCaching }, { simd });

    beforeAll(async () => {
      const dir = await tinyModel(family);
      spec = await loadModelSpec(dir);
      const src = await openWeights(dir);
      w = await loadModelWeights(spec, src);
      await src.close();
    });

    it('gives bit-identical logits and hidden states for every page size and both kernels, through truncates and releases', async () => {
      const models = [model(1, 4096, true, false), model(3, 2048), model(16, 256), model(5, 1024, false)];
      expect(models.map((m) => m.kernels)).toEqual(['js', 'wasm-simd', 'wasm-simd', 'wasm-simd']);
      const rand = lcg(99);
      for (let step = 0; step < 24; step++) {
        const sequences: StepSequence[] = [];
        const used = new Set<number>();
        for (let i = 0, k = 1 + rand(4); i < k; i++) {
          const seq = rand(6);
          if (used.has(seq)) continue;
          used.add(seq);
          const len = 1 + rand(step % 4 === 0 ? 30 : 3);
          sequences.push({
            seq,
            tokens: Array.from({ length: len }, () => rand(spec.vocabSize)),
            logits: (['all', 'last', 'none'] as const)[rand(3)],
            hiddenLayers: rand(2) ? [0, spec.numLayers - 1] : undefined,
          });
        }
        const outs = await Promise.all(models.map((m) => m.step({ sequences })));
        for (const o of outs.slice(1)) {
          o.sequences.forEach((s, i) => {
            expect(same(s.logits, outs[0].sequences[i].logits)).toBe(true);
            for (const [l, h] of outs[0].sequences[i].hidden ?? []) expect(same(s.hidden!.get(l)!, h)).toBe(true);
          });
        }
        const r = rand(6);
        if (rand(3) === 0) models.forEach((m) => m.release(r));
        else if (rand(2) === 0 && models[0].length(r)) {
          const to = rand(models[0].length(r) + 1);
          models.forEach((m) => m.truncate(r, to));
        }
      }
      for (const m of models) {
        for (let s = 0; s < 6; s++) m.release(s);
        expect(m.kvPages().used).toBe(0);
      }
    });

    it('frees pages on release and truncate, and says clearly when the pool is exhausted', async () => {
      const m = model(4, 6, false);
      expect(m.kvPages()).toEqual({ pageSize: 4, total: 6, free: 6, cached: 0, used: 0 });
      await m.step({ sequences: [{ seq: 1, tokens: [1, 2, 3, 4, 5, 6, 7, 8, 9], logits: 'none' }] });
      expect(m.kvPages().used).toBe(3);
      m.truncate(1, 4);
      expect(m.kvPages().used).toBe(1);
      await expect(m.step({ sequences: [{ seq: 2, tokens: Array(24).fill(3), logits: 'last' }] })).rejects.toThrow(/KV cache full.*kvCache\.pages/);
      expect(m.reserve(2, 20)).toBe(true);
      expect(m.reserve(3, 1)).toBe(false);
      m.release(1);
      m.release(2);
      expect(m.kvPages()).toMatchObject({ free: 6, used: 0 });
      expect(m.memory().kvCache).toBeGreaterThan(0);
    });

    it('reuses full pages of a shared prefix, bit-identically, and copies a shared page before writing it', async () => {
      const m = model(4, 64);
      const fresh = model(4, 64, false);
      const prefix = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20];
      const a = [...prefix, 30, 31];
      await m.step({ sequences: [{ seq: 1, tokens: a, logits: 'none' }] });
      m.reserve(1, a.length); // commits its full pages to the prefix index
      const b = [...prefix, 40, 41, 42];
      expect(m.reusePrefix(2, b)).toBe(8);
      expect(m.kvPages().used).toBe(3 + 0); // two of sequence 1's pages are shared, not copied
      const got = await m.step({ sequences: [{ seq: 2, tokens: b.slice(8), logits: 'all' }] });
      const want = await fresh.step({ sequences: [{ seq: 2, tokens: b, logits: 'all' }] });
      const V = spec.vocabSize;
      expect(same(got.sequences[0].logits, want.sequences[0].logits.subarray(8 * V))).toBe(true);

      // Roll sequence 2 back into a shared page and write different tokens there: sequence 1 must
      // still see its own keys and values.
      m.truncate(2, 6);
      fresh.truncate(2, 6);
      await m.step({ sequences: [{ seq: 2, tokens: [50, 51, 52], logits: 'none' }] });
      const after = await m.step({ sequences: [{ seq: 1, tokens: [7], logits: 'last' }] });
      const ref = await fresh.step({ sequences: [{ seq: 9, tokens: [...a, 7], logits: 'last' }] });
      expect(same(after.sequences[0].logits, ref.sequences[0].logits)).toBe(true);

      // A prompt identical to a cached one still runs its last token.
      m.release(1);
      m.release(2);
      expect(m.reusePrefix(3, a.slice(0, 8))).toBe(4);
      expect(m.reusePrefix(4, [99, ...a])).toBe(0);
      m.release(3);
      m.release(4);
      expect(m.kvPages().used).toBe(0);
      expect(m.kvPages().cached).toBeGreaterThan(0);
    });

    it('evicts cached pages, least recently released leaves first, when the free list runs dry', async () => {
      const m = model(2, 8);
      await m.step({ sequences: [{ seq: 1, tokens: [1, 2, 3, 4, 5, 6, 7, 8], logits: 'none' }] });
      m.release(1);
      expect(m.kvPages()).toMatchObject({ cached: 4, free: 4, used: 0 });
      await m.step({ sequences: [{ seq: 2, tokens: [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], logits: 'none' }] });
      expect(m.kvPages()).toMatchObject({ cached: 2, free: 0, used: 6 });
      // The chain's head survived; its tail went first.
      expect(m.reusePrefix(3, [1, 2, 3, 4, 5, 6, 7, 8, 0])).toBe(4);
      m.release(2);
      m.release(3);
      expect(m.kvPages().used).toBe(0);
    });
  });
}
