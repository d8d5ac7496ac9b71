import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { routeDiff } from '../src/cli/commands/route-diff.js';
import { compareRouting, explainFirstDifference, loadModel, route, routerMargin, type RoutingTrace } from '@moeflash/core';

const golden = path.join(__dirname, 'fixtures', 'golden');
const fixture = path.join(golden, 'gpt_oss_mxfp4');

async function traceOf(tokens: number[]) {
  const h = await loadModel({ model: fixture, backend: 'cpu' });
  try {
    const res = await h.model.step({ sequences: [{ seq: 0, tokens, logits: 'all', traceRouting: true }] });
    return { spec: h.spec, out: res.sequences[0] };
  } finally {
    await h.model.dispose();
  }
}

describe('routing trace (StepSequence.traceRouting) on the CPU backend', () => {
  it('returns every MoE layer\'s router logits and the experts route() picks from them', async () => {
    const { sequences } = JSON.parse(fs.readFileSync(path.join(fixture, 'input.json'), 'utf8')) as { sequences: number[][] };
    const tokens = sequences[1];
    const { spec, out } = await traceOf(tokens);
    const tr = out.routing!;
    const E = spec.moe.numExperts;
    const K = spec.moe.topK;
    expect(tr.logits).toHaveLength(spec.numLayers);
    for (let l = 0; l < spec.numLayers; l++) {
      expect(tr.logits[l]).toHaveLength(tokens.length * E);
      expect(tr.experts[l]).toHaveLength(tokens.length * K);
      for (let p = 0; p < tokens.length; p++) {
        const r = route(tr.logits[l].subarray(p * E, (p + 1) * E), spec.moe);
        expect(Array.from(tr.experts[l].subarray(p * K, (p + 1) * K))).toEqual(Array.from(r.experts));
      }
    }
  });

  it('is the same whether a sequence runs alone or batched (no step leaks into another\'s trace)', async () => {
    const h = await loadModel({ model: fixture, backend: 'cpu' });
    try {
      const a = [5, 9, 17, 2, 40], b = [7, 7, 1];
      const alone = (await h.model.step({ sequences: [{ seq: 0, tokens: a, logits: 'none', traceRouting: true }] })).sequences[0].routing!;
      const both = await h.model.step({ sequences: [{ seq: 1, tokens: b, logits: 'none' }, { seq: 2, tokens: a, logits: 'none', traceRouting: true }] });
      expect(both.sequences[0].routing).toBeUndefined();
      const batched = both.sequences[1].routing!;
      for (let l = 0; l < alone.experts.length; l++) {
        expect(Array.from(batched.experts[l])).toEqual(Array.from(alone.experts[l]));
        expect(Array.from(batched.logits[l])).toEqual(Array.from(alone.logits[l]));
      }
    } finally {
      await h.model.dispose();
    }
  });
});

describe('compareRouting', () => {
  const dims = { vocab: 4, numExperts: 4, topK: 2 };
  // Two positions, one MoE layer: position 0 is a near-tie between experts 1 and 2.
  const reference = (): { logits: Float32Array; routing: RoutingTrace } => ({
    logits: Float32Array.from([1, 2, 3, 4, 4, 3, 2, 1]),
    routing: {
      logits: [Float32Array.from([5, 2, 2.00001, -1, 0, 3, 1, 4])],
      experts: [Int32Array.from([0, 2, 3, 1])],
    },
  });

  it('finds nothing when both sides are the same', () => {
    const c = compareRouting(reference(), reference(), dims);
    expect(c.differences).toEqual([]);
    expect(c.logitsError).toBe(0);
    expect(c.top1).toBe(1);
    expect(explainFirstDifference(c)).toMatch(/identical at all 2/);
  });

  it('calls a flip inside the reference margin a near-tie, and names the first difference', () => {
    const other = reference();
    other.routing.logits[0][1] = 2.00002; // expert 1 now edges out expert 2 at position 0
    other.routing.experts[0][1] = 1;
    other.logits[7] = 9; // position 1 now picks another token
    const c = compareRouting(reference(), other, dims);
    expect(c.differences).toHaveLength(1);
    const d = c.differences[0];
    expect(d).toMatchObject({ layer: 0, position: 0, reference: [0, 2], other: [0, 1], first: true });
    expect(d.margin).toBeCloseTo(1e-5, 6);
    expect(c.nearTies.map((t) => t.position)).toEqual([0]);
    expect(c.top1).toBe(0.5);
    expect(explainFirstDifference(c)).toMatch(/near-tie flipped by rounding/);
  });

  it('calls a difference at a clear margin a disagreement', () => {
    const other = reference();
    other.routing.experts[0].set([1, 3], 2); // position 1: [3, 1] -> [1, 3] is the same set
    other.routing.experts[0].set([0, 1], 0); // position 0: expert 1 instead of 2, logits unchanged
    const c = compareRouting(reference(), other, dims);
    expect(c.differences.map((d) => d.position)).toEqual([0]);
    expect(explainFirstDifference(c)).toMatch(/clear margin/);
  });

  it('measures the margin between the k-th choice and the best expert left out', () => {
    expect(routerMargin(Float32Array.from([0.5, 3, -1, 2]), 0, 4, [1, 3])).toEqual({ margin: 1.5, scale: 3 });
  });
});

describe('moeflash route-diff', () => {
  it('compares two backends from the command line and writes the JSON report', async () => {
    const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'route-diff-')), 'r.json');
    const lines: string[] = [];
    const log = vi.spyOn(console, 'log').mockImplementation((l: string) => void lines.push(l));
    try {
      await routeDiff(['--model', fixture, '--random', '12', '--backend', 'cpu', '--against', 'cpu', '--json', out]);
    } finally {
      log.mockRestore();
    }
    const text = lines.join('\n');
    expect(text).toMatch(/sequence 0 \(12 tokens\): cpu vs cpu logits 0\.00e\+0 relative/);
    expect(text).toMatch(/routing identical at all 48/);
    await expect(routeDiff(['--model', fixture])).rejects.toThrow(/one of --input IDS.json or --random LEN/);
    const j = JSON.parse(fs.readFileSync(out, 'utf8'));
    expect(j.sequences[0].differences).toEqual([]);
  });
});
