/**
 * The router folded into the o projection (gemv_bf16_fold + the MoE kernels' fold_router): at
 * decode steps of one or two tokens on the tensor-core MoE path, the o projection's blocks leave
 * per-block partial sums of W_r (g * v) and of v^2, and every MoE block turns them into the router
 * logits, so no router launch runs between. A small gpt-oss checkpoint (biases, sinks, sliding
 * window, interleaved gate/up, MXFP4 experts) at shapes that take the tensor-core path, against the
 * CPU backend teacher-forced, and against the same device path with the router launch kept
 * (MOEFLASH_ROUTER_FOLD=0, read when a step's graph is captured). Needs a GPU.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { argmax, CpuBackend, loadModelSpec, openWeights, synthesizeModel, type ModelSpec, type WeightSource } from '@moeflash/core';
import { createCudaBackend, isCudaAvailable, type CudaModel } from '@moeflash/cuda-backend';

import { relError } from './helpers.js';

const avail = isCudaAvailable();
if (!avail.ok) console.log(`[cuda] router fold tests skipped: ${avail.reason}`);

// Hidden and expert widths multiples of 64 (the tensor-core MoE path), 16 experts, top-4.
const OVERRIDES = {
  vocab_size: 1024, hidden_size: 256, intermediate_size: 256, num_hidden_layers: 2, num_attention_heads: 4,
  num_key_value_heads: 2, head_dim: 64, num_local_experts: 16, sliding_window: 8,
  layer_types: ['sliding_attention', 'full_attention'], eos_token_id: 1023, pad_token_id: 1022,
};
const PROMPTS = [
  [5, 900, 17, 300, 301, 44, 1000, 2, 77, 650],
  [12, 12, 400, 33, 901, 5, 6, 7],
];
const STEPS = 16;

describe.skipIf(!avail.ok)('CUDA router folded into the o projection', () => {
  let dir = '';
  let spec: ModelSpec;
  let w: WeightSource;
  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-fold-'));
    await synthesizeModel({ preset: 'gpt-oss-20b', overrides: OVERRIDES, out: dir, seed: 11 });
    spec = await loadModelSpec(dir);
    w = await openWeights(dir);
  });
  afterAll(async () => {
    await w?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Prefill every prompt, then STEPS decode steps (batch 1 on even steps, 2 on odd) with the given tokens. */
  async function decodeRows(model: { step: CudaModel['step'] }, tokens: number[][]): Promise<Float32Array[]> {
    const rows: Float32Array[] = [];
    for (let s = 0; s < PROMPTS.length; s++) await model.step({ sequences: [{ seq: s, tokens: PROMPTS[s], logits: 'last' }] });
    for (let i = 0; i < STEPS; i++) {
      const seqs = i % 2 === 0 ? [0] : [0, 1];
      const out = await model.step({ sequences: seqs.map((s) => ({ seq: s, tokens: [tokens[s][i]], logits: 'last' as const })) });
      for (const sq of out.sequences) rows.push(Float32Array.from(sq.logits));
    }
    return rows;
  }

  it('decode logits match the CPU backend and the unfolded router launch', async () => {
    // The CPU's greedy continuation of each prompt: the tokens every backend is fed.
    const cpu = await new CpuBackend().load(spec, w);
    const tokens: number[][] = PROMPTS.map(() => []);
    const V = spec.vocabSize;
    const cpuRows: Float32Array[] = [];
    const last: number[] = [];
    for (let s = 0; s < PROMPTS.length; s++) {
      const o = await cpu.step({ sequences: [{ seq: s, tokens: PROMPTS[s], logits: 'last' }] });
      last[s] = argmax(o.sequences[0].logits.subarray(0, V));
    }
    for (let i = 0; i < STEPS; i++) {
      const seqs = i % 2 === 0 ? [0] : [0, 1];
      for (const s of [0, 1]) tokens[s][i] = last[s];
      const o = await cpu.step({ sequences: seqs.map((s) => ({ seq: s, tokens: [last[s]], logits: 'last' as const })) });
      o.sequences.forEach((sq, j) => {
        cpuRows.push(Float32Array.from(sq.logits));
        last[seqs[j]] = argmax(sq.logits);
      });
    }
    await cpu.dispose();

    const opts = { maxSequences: 2, maxSequenceLength: 64, maxStepTokens: 16 };
    const folded = (await createCudaBackend().load(spec, w, opts)) as CudaModel;
    expect(folded.expertFormat).toBe('mxfp4');
    const foldedRows = await decodeRows(folded, tokens);
    expect(folded.stats.graphSteps).toBeGreaterThan(0);
    await folded.dispose();

    const prev = process.env.MOEFLASH_ROUTER_FOLD;
    process.env.MOEFLASH_ROUTER_FOLD = '0';
    let plainRows: Float32Array[];
    try {
      const plain = (await createCudaBackend().load(spec, w, opts)) as CudaModel;
      plainRows = await decodeRows(plain, tokens);
      await plain.dispose();
    } finally {
      if (prev === undefined) delete process.env.MOEFLASH_ROUTER_FOLD;
      else process.env.MOEFLASH_ROUTER_FOLD = prev;
    }

    const vsCpu = foldedRows.map((r, i) => relError(r, cpuRows[i]));
    const plainVsCpu = plainRows.map((r, i) => relError(r, cpuRows[i]));
    const vsPlain = foldedRows.map((r, i) => relError(r, plainRows[i]));
    const agreeCpu = foldedRows.filter((r, i) => argmax(r) === argmax(cpuRows[i])).length;
    const agreePlain = foldedRows.filter((r, i) => argmax(r) === argmax(plainRows[i])).length;
    const worst = (a: number[]) => Math.max(...a).toExponential(2);
    const within = (a: number[]) => a.filter((e) => e <= 1e-2).length;
    console.log(
      `[cuda] router fold, ${foldedRows.length} decode rows: vs CPU worst ${worst(vsCpu)}, within 1e-2 ${within(vsCpu)} (router launch: worst ${worst(plainVsCpu)}, within ${within(plainVsCpu)}), top-1 ${agreeCpu}; vs router launch worst ${worst(vsPlain)}, top-1 ${agreePlain}`,
    );
    // Random weights at these small widths give flat logits, so the device path (f16 expert inputs,
    // bf16 cache) sits a little further from the CPU than on the real checkpoints; the fold must
    // not move it further than the router launch does.
    expect(Math.max(...vsCpu)).toBeLessThanOrEqual(5e-2);
    expect(within(vsCpu)).toBeGreaterThanOrEqual(within(plainVsCpu) - 1);
    expect(agreeCpu / foldedRows.length).toBeGreaterThanOrEqual(0.9);
    // The same operations in another order: rounding-level differences, so the fold did run, and
    // no more than that.
    expect(Math.max(...vsPlain)).toBeGreaterThan(0);
    expect(Math.max(...vsPlain)).toBeLessThanOrEqual(1e-3);
    expect(agreePlain).toBe(foldedRows.length);
  });
});
