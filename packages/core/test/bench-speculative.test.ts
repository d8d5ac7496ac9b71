import { describe, expect, it } from 'vitest';
import { acceptedFor, benchSpeculative } from '../src/cli/commands/bench-speculative.js';

describe('moeflash bench --speculative: set acceptance', () => {
  it('keeps drafts so that rounds emit TAU tokens on average, and all of them when B + 1 <= TAU', () => {
    for (const tau of [1, 2.2, 4, 6.3, 9.5]) {
      for (const b of [1, 4, 8, 16]) {
        let emitted = 0;
        const rounds = 2000;
        for (let r = 0; r < rounds; r++) {
          const k = acceptedFor(tau, b, r);
          expect(k).toBeGreaterThanOrEqual(0);
          expect(k).toBeLessThanOrEqual(b);
          emitted += k + 1;
        }
        const want = Math.min(tau, b + 1);
        // Rounds that would keep more than B keep B, so the mean sits at or under TAU.
        if (b + 1 >= Math.ceil(tau)) expect(emitted / rounds).toBeCloseTo(want, 1);
        else expect(emitted / rounds).toBe(b + 1);
      }
    }
  });

  it('names bad arguments', async () => {
    await expect(benchSpeculative(['--speculative', 'eagle', '--model', 'x', '--draft', 'y'])).rejects.toThrow(/--speculative takes dflash/);
    await expect(benchSpeculative(['--speculative', 'dflash', '--model', 'x', '--draft', 'y', '--accept', '40'])).rejects.toThrow(/--accept is tokens a round, from 1 to 17/);
    await expect(benchSpeculative(['--speculative', 'dflash', '--model', 'x'])).rejects.toThrow(/--draft is required/);
  });
});
