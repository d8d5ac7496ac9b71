import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadModel, openWeights } from '@moeflash/core';

const root = path.join(__dirname, 'fixtures', 'golden');
const fixtures = fs.existsSync(root) ? fs.readdirSync(root).filter((d) => fs.existsSync(path.join(root, d, 'logits.safetensors'))) : [];

describe('parity with HF transformers (golden fixtures)', () => {
  it('has fixtures for every family', () => {
    for (const family of ['qwen3_moe', 'mixtral', 'gpt_oss']) {
      expect(fixtures.some((f) => f.startsWith(family)), `a ${family} fixture under ${root}`).toBe(true);
    }
  });

  for (const name of fixtures) {
    it(`${name}: CPU logits match HF within 1e-3 at every position`, async () => {
      const dir = path.join(root, name);
      const { sequences } = JSON.parse(fs.readFileSync(path.join(dir, 'input.json'), 'utf8')) as { sequences: number[][] };
      const h = await loadModel({ model: dir, backend: 'cpu' });
      const ref = await openWeights(path.join(dir, 'logits.safetensors'));
      try {
        const res = await h.model.step({ sequences: sequences.map((tokens, i) => ({ seq: i, tokens, logits: 'all' as const })) });
        for (let i = 0; i < sequences.length; i++) {
          const want = await ref.readFloat32(`logits.${i}`);
          const got = res.sequences[i].logits;
          expect(got.length).toBe(want.length);
          let maxDiff = 0;
          let at = -1;
          for (let j = 0; j < want.length; j++) {
            const d = Math.abs(got[j] - want[j]);
            if (!(d <= maxDiff)) {
              maxDiff = d;
              at = j;
            }
          }
          expect(maxDiff, `sequence ${i}: max |diff| ${maxDiff} at position ${Math.floor(at / h.spec.vocabSize)}`).toBeLessThanOrEqual(1e-3);
        }
      } finally {
        await ref.close();
        await h.model.dispose();
      }
    });
  }
});
