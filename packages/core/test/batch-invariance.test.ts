import { beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type ModelHandle } from '@moeflash/core';
import { tinyModel } from './helpers.js';

const seqA = [5, 17, 99, 3, 250, 41, 8, 77, 300, 12];
const seqB = [1, 2, 3];
const seqC = [400, 401, 402, 403, 404, 405, 406];

for (const family of ['qwen3_moe', 'gpt_oss'] as const) {
  describe(`${family}: batch invariance of the CPU backend`, () => {
    let h: ModelHandle;
    beforeAll(async () => {
      h = await loadModel({ model: await tinyModel(family), backend: 'cpu' });
    });

    it('a sequence gives bit-identical logits alone and beside others', async () => {
      const alone = await h.model.step({ sequences: [{ seq: 1, tokens: seqA, logits: 'all' }] });
      const batched = await h.model.step({
        sequences: [
          { seq: 2, tokens: seqB, logits: 'all' },
          { seq: 3, tokens: seqA, logits: 'all' },
          { seq: 4, tokens: seqC, logits: 'last' },
        ],
      });
      expect(Buffer.from(batched.sequences[1].logits.buffer).equals(Buffer.from(alone.sequences[0].logits.buffer))).toBe(true);
      [1, 2, 3, 4].forEach((s) => h.model.release(s));
    });

    it('one token a step gives the same logits as the whole prompt at once', async () => {
      const once = await h.model.step({ sequences: [{ seq: 10, tokens: seqA, logits: 'all' }] });
      const V = h.spec.vocabSize;
      for (let i = 0; i < seqA.length; i++) {
        const r = await h.model.step({ sequences: [{ seq: 11, tokens: [seqA[i]], logits: 'last' }] });
        const want = once.sequences[0].logits.subarray(i * V, (i + 1) * V);
        expect(Array.from(r.sequences[0].logits)).toEqual(Array.from(want));
      }
      expect(h.model.length(11)).toBe(seqA.length);
      h.model.release(10);
      h.model.release(11);
    });

    it('truncate rolls a sequence back as if the dropped tokens never ran', async () => {
      await h.model.step({ sequences: [{ seq: 20, tokens: seqA.slice(0, 6), logits: 'none' }] });
      await h.model.step({ sequences: [{ seq: 20, tokens: [9, 9, 9], logits: 'none' }] });
      h.model.truncate(20, 6);
      const after = await h.model.step({ sequences: [{ seq: 20, tokens: seqA.slice(6), logits: 'all' }] });
      const fresh = await h.model.step({ sequences: [{ seq: 21, tokens: seqA, logits: 'all' }] });
      const V = h.spec.vocabSize;
      expect(Array.from(after.sequences[0].logits)).toEqual(Array.from(fresh.sequences[0].logits.subarray(6 * V)));
      expect(() => h.model.truncate(20, 99)).toThrow(/truncate/);
    });

    it('rejects token ids outside the vocabulary with a clear error', async () => {
      await expect(h.model.step({ sequences: [{ seq: 30, tokens: [h.spec.vocabSize], logits: 'last' }] })).rejects.toThrow(/outside the vocabulary/);
    });
  });
}
