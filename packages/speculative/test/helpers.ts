import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createEngine, type Engine, type GenerateOptions, type Speculator } from '@moeflash/core';
import { synthesizeDflashDraft } from '@moeflash/speculative';
import { tinyModel } from '../../core/test/helpers.js';

export { tinyModel };
export type Family = 'qwen3_moe' | 'gpt_oss';

/** A tiny target of the family and a random DFlash drafter for it, written once per process. */
const made = new Map<string, Promise<{ target: string; draft: string }>>();
export function tinyPair(family: Family, draftLayers = 1): Promise<{ target: string; draft: string }> {
  const key = `${family}/${draftLayers}`;
  if (!made.has(key)) {
    made.set(
      key,
      (async () => {
        const target = await tinyModel(family);
        const draft = fs.mkdtempSync(path.join(os.tmpdir(), `moeflash-dflash-${family}-`));
        await synthesizeDflashDraft(target, draft, { blockSize: 16, numLayers: draftLayers, seed: 11, intermediateSize: 64 });
        return { target, draft };
      })(),
    );
  }
  return made.get(key)!;
}

export async function engineFor(model: string, speculative?: Parameters<typeof createEngine>[0]['speculative']): Promise<Engine> {
  return createEngine({ model, backend: 'cpu', speculative, log: () => {} });
}

/** An engine whose speculator is a test-made one. */
export async function engineWith(model: string, speculator: Speculator): Promise<Engine> {
  const e = await engineFor(model);
  e.speculator = speculator;
  return e;
}

export async function tokens(engine: Engine, prompt: number[], opts: GenerateOptions): Promise<number[]> {
  return (await engine.generate(prompt, { ignoreEos: true, ...opts }).result).tokens;
}

/**
 * P(X >= x) for X chi-square with k degrees of freedom: the regularized upper incomplete gamma
 * Q(k/2, x/2), by its series below a + 1 and its continued fraction above (Numerical Recipes 6.2).
 */
export function chiSquareSurvival(x: number, k: number): number {
  const a = k / 2;
  const z = x / 2;
  if (z <= 0) return 1;
  const lnGammaA = lnGamma(a);
  if (z < a + 1) {
    let sum = 1 / a;
    let term = sum;
    for (let n = 1; n < 1000; n++) {
      term *= z / (a + n);
      sum += term;
      if (Math.abs(term) < Math.abs(sum) * 1e-15) break;
    }
    return 1 - sum * Math.exp(-z + a * Math.log(z) - lnGammaA);
  }
  let b = z + 1 - a;
  let c = 1 / 1e-300;
  let d = 1 / b;
  let h = d;
  for (let i = 1; i < 1000; i++) {
    const an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (Math.abs(d) < 1e-300) d = 1e-300;
    c = b + an / c;
    if (Math.abs(c) < 1e-300) c = 1e-300;
    d = 1 / d;
    const del = d * c;
    h *= del;
    if (Math.abs(del - 1) < 1e-15) break;
  }
  return Math.exp(-z + a * Math.log(z) - lnGammaA) * h;
}

function lnGamma(x: number): number {
  const g = [676.5203681218851, -1259.1392167224028, 771.32342877765313, -176.61502916214059, 12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7];
  if (x < 0.5) return Math.log(Math.PI / Math.sin(Math.PI * x)) - lnGamma(1 - x);
  x -= 1;
  let a = 0.99999999999980993;
  const t = x + 7.5;
  for (let i = 0; i < 8; i++) a += g[i]! / (x + i + 1);
  return 0.5 * Math.log(2 * Math.PI) + (x + 0.5) * Math.log(t) - t + Math.log(a);
}

/**
 * Pearson's goodness-of-fit test of observed counts against expected probabilities. Cells whose
 * expected count is below 5 are pooled into one, as the chi-square approximation asks. Returns
 * the statistic, degrees of freedom and p-value.
 */
export function goodnessOfFit(counts: Map<string, number> | number[], expected: Map<string, number> | number[], n: number): { stat: number; df: number; p: number } {
  const keys = Array.isArray(expected) ? expected.map((_, i) => String(i)) : [...expected.keys()];
  const get = (m: Map<string, number> | number[], k: string) => (Array.isArray(m) ? m[Number(k)] ?? 0 : m.get(k) ?? 0);
  let stat = 0;
  let cells = 0;
  let pooledObs = 0;
  let pooledExp = 0;
  let observedTotal = 0;
  for (const k of keys) {
    const e = get(expected, k) * n;
    const o = get(counts, k);
    observedTotal += o;
    if (e < 5) {
      pooledObs += o;
      pooledExp += e;
      continue;
    }
    stat += ((o - e) * (o - e)) / e;
    cells++;
  }
  // Anything observed outside the expected support lands in the pooled cell too.
  pooledObs += n - observedTotal;
  if (pooledExp > 0) {
    stat += ((pooledObs - pooledExp) * (pooledObs - pooledExp)) / pooledExp;
    cells++;
  } else if (pooledObs > 0) {
    return { stat: Infinity, df: Math.max(1, cells - 1), p: 0 };
  }
  const df = Math.max(1, cells - 1);
  return { stat, df, p: chiSquareSurvival(stat, df) };
}
