import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { lookupDraft, type SpeculativeStats } from '@moeflash/speculative';
import { engineFor, tinyPair } from './helpers.js';

describe('lookupDraft', () => {
  it('copies what followed the most recent earlier occurrence of the longest matching suffix', () => {
    //            0  1  2  3  4  5  6  7  8  9 10
    const t = [1, 2, 3, 9, 1, 2, 4, 5, 7, 1, 2];
    // suffix [1, 2] last occurred at 4..5 (followed by 4, 5, 7), before that at 0..1.
    expect(lookupDraft(t, 3, 1, 2)).toEqual([4, 5, 7]);
    // With n = 3 the suffix [7, 1, 2] never occurred before; n falls back to 2.
    expect(lookupDraft(t, 2, 1, 3)).toEqual([4, 5]);
    // The longer match wins over a more recent shorter one.
    expect(lookupDraft([5, 6, 7, 8, 0, 7, 9, 6, 7], 2, 1, 2)).toEqual([8, 0]);
  });

  it('respects minNgram and finds nothing in fresh text', () => {
    expect(lookupDraft([1, 2, 3, 4, 3], 4, 2, 3)).toEqual([]);
    expect(lookupDraft([1, 2, 3, 4, 3], 4, 1, 3)).toEqual([4, 3, 4, 3]);
    expect(lookupDraft([1, 2, 3, 4, 5], 4, 1, 3)).toEqual([]);
    expect(lookupDraft([7], 4, 1, 3)).toEqual([]);
  });

  it('continues a periodic context for a whole block (copy with overlap)', () => {
    expect(lookupDraft([4, 1, 2, 1, 2], 6, 1, 2)).toEqual([1, 2, 1, 2, 1, 2]);
    expect(lookupDraft([3, 3], 5, 1, 1)).toEqual([3, 3, 3, 3, 3]);
  });

  it('every proposal is a continuation of an earlier occurrence of the suffix', () => {
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 0, max: 3 }), { minLength: 2, maxLength: 40 }), fc.integer({ min: 1, max: 8 }), (t, b) => {
        const d = lookupDraft(t, b, 1, 3);
        if (d.length === 0) return;
        expect(d.length).toBe(b);
        const s = [...t, ...d];
        // Some n >= 1 and start j < len - n have s[j..j+n) equal to the suffix and s[j+n..] = d.
        const len = t.length;
        const ok = [1, 2, 3].some((n) => {
          if (n > len - 1) return false;
          for (let j = 0; j + n < len; j++) {
            if (t.slice(j, j + n).join() !== t.slice(len - n).join()) continue;
            if (d.every((x, i) => s[j + n + i] === x)) return true;
          }
          return false;
        });
        expect(ok).toBe(true);
      }),
    );
  });
});

describe('prompt lookup through the engine', () => {
  it('drafts from a repetitive prompt, and its statistics add up', async () => {
    const { target } = await tinyPair('qwen3_moe');
    const engine = await engineFor(target, { method: 'prompt-lookup', blockSize: 8, maxNgram: 3 });
    const text = 'def add(a, b):\n    return a + b\n\n'.repeat(4);
    const r = await engine.generate(text, { maxTokens: 48, temperature: 0, ignoreEos: true }).result;
    const s = r.speculation as SpeculativeStats;
    expect(s.method).toBe('prompt-lookup');
    expect(s.acceptedTokens).toBeLessThanOrEqual(s.draftedTokens);
    expect(s.rounds).toBe(s.roundsByBlockSize.reduce((a, b) => a + b, 0));
    // Every round emits accepted + 1 tokens; the first token comes from the prefill.
    expect(s.acceptedTokens + s.rounds).toBe(r.tokens.length - 1);
    expect(s.meanAcceptedPerRound).toBeCloseTo((s.acceptedTokens + s.rounds) / s.rounds, 10);
    expect(s.acceptanceByPosition.every((a, i) => i === 0 || a <= s.acceptanceByPosition[i - 1]! + 1e-12)).toBe(true);
    expect(s.acceptedTokens).toBeGreaterThan(0);
    await engine.close();
  });
});
