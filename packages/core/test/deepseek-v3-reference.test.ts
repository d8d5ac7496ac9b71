/**
 * deepseek_v3 on the CPU backend against the float64 numpy reference forward of
 * tools/golden/make_fixtures.py (MLA in HF's expanded form, grouped sigmoid routing, shared
 * experts, FP8 block scales), on checkpoints that script writes (`--dry-run`). HF transformers'
 * own logits for the same checkpoints come from a GPU host later (golden-parity.test.ts picks
 * them up from fixtures/golden); until then this holds the family to the reference in CI.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadModel, openWeights } from '@moeflash/core';

const root = path.join(__dirname, 'fixtures', 'reference');
const fixtures = ['deepseek_v3_fp8', 'deepseek_v3_bf16'];

describe('deepseek_v3: CPU backend against the float64 reference of make_fixtures.py', () => {
  for (const name of fixtures) {
    it(`${name}: logits within 1e-4 of the reference at every position (measured 1.4e-6), top-1 everywhere`, async () => {
      const dir = path.join(root, name);
      const { sequences } = JSON.parse(fs.readFileSync(path.join(dir, 'input.json'), 'utf8')) as { sequences: number[][] };
      const h = await loadModel({ model: dir, backend: 'cpu', checkFiniteWeights: true });
      const ref = await openWeights(path.join(dir, 'reference_logits.safetensors'));
      try {
        const res = await h.model.step({ sequences: sequences.map((tokens, i) => ({ seq: i, tokens, logits: 'all' as const })) });
        const V = h.spec.vocabSize;
        for (let i = 0; i < sequences.length; i++) {
          const want = await ref.readFloat32(`logits.${i}`);
          const got = res.sequences[i].logits;
          expect(got.length).toBe(want.length);
          let maxDiff = 0;
          let at = 0;
          for (let j = 0; j < want.length; j++) {
            const d = Math.abs(got[j] - want[j]);
            if (d > maxDiff) [maxDiff, at] = [d, j];
          }
          expect(maxDiff, `sequence ${i}: max |diff| ${maxDiff} at position ${Math.floor(at / V)}`).toBeLessThanOrEqual(1e-4);
          for (let p = 0; p < sequences[i].length; p++) {
            const row = (a: Float32Array) => a.subarray(p * V, (p + 1) * V);
            const argmax = (r: Float32Array) => r.reduce((b, v, k) => (v > r[b] ? k : b), 0);
            expect(argmax(row(got)), `sequence ${i} position ${p}`).toBe(argmax(row(want)));
          }
        }
      } finally {
        await ref.close();
        await h.model.dispose();
      }
    });
  }
});
