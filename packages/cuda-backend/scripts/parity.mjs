// Parity of the CUDA backend with HF transformers (golden fixtures' logits) and with the CPU
// backend (greedy generation). Shared by test/model.gpu.test.ts and scripts/parity-report.mjs.
import fs from 'node:fs';
import path from 'node:path';

import { CpuBackend, loadModelSpec, openWeights } from '@moeflash/core';
import { createCudaBackend } from '@moeflash/cuda-backend';

/**
 * Logit gap under which HF's top two count as tied: bf16 KV and activations move logits by a few
 * 1e-3 (the CPU backend keeps float32), so a reference margin below this may flip either way.
 */
export const TIE = 1e-2;

/** Index of the largest value, lowest index among equals (core's argmax rule). */
export function argmax(v, from = 0, n = v.length - from) {
  let best = 0;
  for (let i = 1; i < n; i++) if (v[from + i] > v[from + best]) best = i;
  return best;
}

export function fixtureNames(root) {
  const list = JSON.parse(fs.readFileSync(path.join(root, 'fixtures.json'), 'utf8')).fixtures;
  return list.filter((d) => fs.existsSync(path.join(root, d, 'logits.safetensors')));
}

async function load(backend, dir, opts = {}) {
  const spec = await loadModelSpec(dir);
  const w = await openWeights(dir);
  try {
    return { spec, model: await backend.load(spec, w, opts) };
  } finally {
    await w.close();
  }
}

/** Greedy tokens after `prompt`: one prefill step, then one token a step. */
async function greedy(model, seq, prompt, n) {
  const out = [];
  const margins = [];
  let res = await model.step({ sequences: [{ seq, tokens: prompt, logits: 'last' }] });
  for (let i = 0; i < n; i++) {
    const l = res.sequences[0].logits;
    const t = argmax(l);
    let second = -Infinity;
    for (let j = 0; j < l.length; j++) if (j !== t && l[j] > second) second = l[j];
    out.push(t);
    margins.push(l[t] - second);
    if (i + 1 < n) res = await model.step({ sequences: [{ seq, tokens: [t], logits: 'last' }] });
  }
  model.release(seq);
  return { tokens: out, margins };
}

/**
 * One fixture: every sequence's logits at every position (one step holding all sequences, so
 * batched prefill is what is checked) against HF's, and greedy generation of `genTokens` tokens
 * after each prompt against the CPU backend.
 */
export async function fixtureParity(dir, { genTokens = 32, cudaOptions = {} } = {}) {
  const { sequences } = JSON.parse(fs.readFileSync(path.join(dir, 'input.json'), 'utf8'));
  const cuda = await load(createCudaBackend(), dir, { maxSequences: 4, maxSequenceLength: 128, ...cudaOptions });
  const cpu = await load(new CpuBackend(), dir);
  const ref = await openWeights(path.join(dir, 'logits.safetensors'));
  const V = cuda.spec.vocabSize;
  const result = { fixture: path.basename(dir), expertFormat: cuda.model.expertFormat, sequences: [], greedy: [] };
  try {
    const res = await cuda.model.step({ sequences: sequences.map((tokens, i) => ({ seq: i, tokens, logits: 'all' })) });
    for (let i = 0; i < sequences.length; i++) {
      const want = await ref.readFloat32(`logits.${i}`);
      const got = res.sequences[i].logits;
      let num = 0, den = 0, agree = 0, nan = 0;
      const rows = sequences[i].length;
      for (let j = 0; j < want.length; j++) {
        if (!Number.isFinite(got[j])) nan++;
        num += (got[j] - want[j]) ** 2;
        den += want[j] ** 2;
      }
      let agreeUpToTies = 0;
      for (let r = 0; r < rows; r++) {
        const g = argmax(got, r * V, V), w = argmax(want, r * V, V);
        if (g === w) agree++;
        // A different pick counts as a tie when HF itself puts it within TIE of its own top-1.
        if (g === w || want[r * V + g] >= want[r * V + w] - TIE) agreeUpToTies++;
      }
      let deviceArgmaxOk = 0;
      for (let r = 0; r < rows; r++) if (res.sequences[i].argmax[r] === argmax(got, r * V, V)) deviceArgmaxOk++;
      result.sequences.push({
        length: rows,
        relError: Math.sqrt(num / den),
        top1: agree / rows,
        top1UpToTies: agreeUpToTies / rows,
        nonFinite: nan,
        deviceArgmaxMatches: deviceArgmaxOk / rows,
      });
    }
    for (let i = 0; i < sequences.length; i++) {
      const a = await greedy(cpu.model, 100 + i, sequences[i], genTokens);
      const b = await greedy(cuda.model, 100 + i, sequences[i], genTokens);
      let same = 0;
      while (same < genTokens && a.tokens[same] === b.tokens[same]) same++;
      result.greedy.push({
        prompt: sequences[i].length,
        agree: same,
        of: genTokens,
        // The CPU's top-1 minus top-2 logit where the two first differ: a near tie explains a split.
        cpuMarginAtSplit: same < genTokens ? a.margins[same] : null,
        cudaMarginAtSplit: same < genTokens ? b.margins[same] : null,
      });
    }
    result.graphSteps = cuda.model.stats.graphSteps;
    result.memory = cuda.model.memory();
  } finally {
    await ref.close();
    await cuda.model.dispose();
    await cpu.model.dispose();
  }
  return result;
}

/**
 * Routing of every fixture sequence on CUDA against the CPU backend (each sequence alone, from an
 * empty cache, StepSequence.traceRouting): (layer, position) choices that differ, with the CPU's
 * own margin there, and the worst per-position logits error against the CPU.
 */
export async function routingParity(dir, { cudaOptions = {}, nearTie = 1e-5 } = {}) {
  const { compareRouting } = await import('@moeflash/core');
  const { sequences } = JSON.parse(fs.readFileSync(path.join(dir, 'input.json'), 'utf8'));
  const cuda = await load(createCudaBackend(), dir, { maxSequences: 2, maxSequenceLength: 128, ...cudaOptions });
  const cpu = await load(new CpuBackend(), dir);
  const dims = { vocab: cuda.spec.vocabSize, numExperts: cuda.spec.moe.numExperts, topK: cuda.spec.moe.topK };
  const out = { precision: cuda.model.precision, choices: 0, differences: [], nearTies: 0, worstPosition: 0 };
  try {
    for (const [i, tokens] of sequences.entries()) {
      const run = async (m) => {
        const r = await m.step({ sequences: [{ seq: 200 + i, tokens, logits: 'all', traceRouting: true }] });
        m.release(200 + i);
        return r.sequences[0];
      };
      const c = compareRouting(await run(cpu.model), await run(cuda.model), dims, nearTie);
      out.choices += c.choices;
      out.nearTies += c.nearTies.length;
      out.worstPosition = Math.max(out.worstPosition, ...c.positionErrors);
      for (const d of c.differences) out.differences.push({ seq: i, ...d });
    }
  } finally {
    await cuda.model.dispose();
    await cpu.model.dispose();
  }
  // A difference is excused only where the CPU's own margin is a near-tie.
  out.unexplained = out.differences.filter((d) => d.relativeMargin >= nearTie);
  return out;
}
