/**
 * The step program (src/step-program.ts) on the CPU: for the bundled model, every golden
 * fixture's shape and the gpt-oss-20b / qwen3-30b-a3b presets, the task graph is acyclic with
 * producers before consumers, every weight byte is read by one task (the sum is the bandwidth
 * model's), the per-SM queues cannot deadlock, the placement is balanced, and batch buckets and
 * verify sizes change only what they should.
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { bytesPerToken, loadModelSpec, parseModelConfig, PRESETS, type ModelSpec } from '@moeflash/core';
import { decodeBytes } from '../../core/src/cli/commands/bench.js';
import {
  buildStepProgram,
  exportStepProgram,
  formatStepProgram,
  simulate,
  TASK_ARGS,
  TASK_KINDS,
  type StepProgram,
  type StepProgramOptions,
} from '../src/step-program.js';

const repo = path.join(__dirname, '..', '..', '..');
const golden = path.join(repo, 'packages', 'core', 'test', 'fixtures', 'golden');
const SMS = 132;

interface Case {
  name: string;
  spec: ModelSpec;
  expertFormat: 'mxfp4' | 'bf16';
  large: boolean;
}

const cases: Case[] = [];
const preset = (name: string) => parseModelConfig(PRESETS[name].config, `preset ${name}`);
cases.push({ name: 'gpt-oss-20b', spec: preset('gpt-oss-20b'), expertFormat: 'mxfp4', large: true });
cases.push({ name: 'qwen3-30b-a3b', spec: preset('qwen3-30b-a3b'), expertFormat: 'mxfp4', large: true });
cases.push({ name: 'moeflash-tiny-coder', spec: await loadModelSpec(path.join(repo, 'models', 'moeflash-tiny-coder')), expertFormat: 'mxfp4', large: false });
for (const d of fs.readdirSync(golden).sort()) {
  if (!fs.existsSync(path.join(golden, d, 'config.json'))) continue;
  const spec = await loadModelSpec(path.join(golden, d));
  cases.push({ name: d, spec, expertFormat: spec.quantization?.method === 'mxfp4' ? 'mxfp4' : 'bf16', large: false });
}

const build = (c: Case, o: Partial<StepProgramOptions> = {}) =>
  buildStepProgram(c.spec, { expertFormat: c.expertFormat, denseFormat: 'bf16', mode: 'decode', tokens: 1, smCount: SMS, ...o });
const format = (c: Case): 'mxfp4 experts + bf16' | 'bf16' => (c.expertFormat === 'mxfp4' ? 'mxfp4 experts + bf16' : 'bf16');
const sum = (p: StepProgram, f: (t: StepProgram['tasks'][number]) => boolean, by: 'bytes' | 'kvBytes' = 'bytes') =>
  p.tasks.filter(f).reduce((s, t) => s + t[by], 0);
const isSlot = (t: { kind: string }) => t.kind === 'gate_up' || t.kind === 'down';

/** Graph, placement and coverage checks every program must pass. */
function checkProgram(c: Case, p: StepProgram) {
  const { spec } = c;
  // Acyclic with producers first: ids are a topological order, levels strictly increase.
  // (Counted in plain loops: one expect a program, not one a dependency.)
  const bad: string[] = [];
  for (const t of p.tasks) {
    for (const d of t.deps) if (d >= t.id || p.tasks[d].level >= t.level) bad.push(`task ${t.id} <- ${d}`);
    for (const w of t.waits) if (w.count !== p.counters[w.counter].producers.length) bad.push(`task ${t.id} waits ${w.count}`);
    if (t.args.length > TASK_ARGS) bad.push(`task ${t.id} args`);
  }
  // Every task sits in exactly one queue at its recorded place, and queues follow the levels.
  const seen = new Set<number>();
  p.queues.forEach((q, s) =>
    q.forEach((id, i) => {
      if (p.tasks[id].sm !== s || p.tasks[id].order !== i) bad.push(`task ${id} placement`);
      if (i > 0 && p.tasks[q[i - 1]].level > p.tasks[id].level) bad.push(`queue ${s} order at ${i}`);
      seen.add(id);
    }),
  );
  // A kernel walking the queues in order finishes, and no task starts before its producers end.
  const sim = simulate(p);
  for (const t of p.tasks) {
    const start = sim.finish[t.id] - (p.options.taskOverheadBytes + t.bytes + t.kvBytes);
    for (const d of t.deps) if (sim.finish[d] > start + 1e-6) bad.push(`task ${t.id} started before ${d}`);
  }
  expect(bad.slice(0, 5)).toEqual([]);
  expect(seen.size).toBe(p.tasks.length);
  // Row tiles cover each matrix exactly once.
  const cover = (kind: string, rows: number, key: (a: number[]) => string, range: (a: number[]) => [number, number]) => {
    const by = new Map<string, [number, number][]>();
    for (const t of p.tasks.filter((x) => x.kind === kind)) {
      const k = `${t.layer}:${key(t.args)}`;
      by.set(k, [...(by.get(k) ?? []), range(t.args)]);
    }
    for (const rs of by.values()) {
      rs.sort((x, y) => x[0] - y[0]);
      let at = 0;
      for (const [r0, n] of rs) {
        if (r0 !== at || n <= 0) bad.push(`${kind} tile at ${r0}`);
        at += n;
      }
      if (at !== rows) bad.push(`${kind} covers ${at} of ${rows}`);
    }
    return by.size;
  };
  const a = spec.attention;
  const moeLayers = spec.layers.filter((l) => l.mlp === 'moe').length;
  expect(cover('qkv', (a.numHeads + 2 * a.numKvHeads) * a.headDim, () => '', (x) => [x[0], x[1]])).toBe(spec.numLayers);
  expect(cover('o', spec.hiddenSize, () => '', (x) => [x[0], x[1]])).toBe(spec.numLayers);
  expect(cover('router', spec.moe.numExperts, () => '', (x) => [x[0], x[1]])).toBe(moeLayers);
  expect(cover('gate_up', spec.moe.intermediateSize, (x) => String(x[0]), (x) => [x[1], x[2]])).toBe(moeLayers * p.expertSlots);
  expect(cover('down', spec.hiddenSize, (x) => String(x[0]), (x) => [x[1], x[2]])).toBe(moeLayers * p.expertSlots);
  expect(cover('lm_head', spec.vocabSize, () => '', (x) => [x[0], x[1]])).toBe(1);
  expect(bad.slice(0, 5)).toEqual([]);
  // Plain data.
  expect(JSON.parse(JSON.stringify(p))).toEqual(p);
}

describe.each(cases)('step program: $name', (c) => {
  it('batch 1: a valid graph whose bytes are the bandwidth model\'s, balanced on the SMs', () => {
    const p = build(c);
    checkProgram(c, p);
    expect(p.expertSlots).toBe(c.spec.moe.topK);
    expect(p.summary.bytes).toBeCloseTo(bytesPerToken(c.spec, format(c)), 0);
    expect(p.summary.bytesExpected).toBeCloseTo(p.summary.bytes, 0);
    if (c.large) {
      // Within 2 % of the mean (measured: 0.2 % for gpt-oss-20b), and every SM busy.
      expect(p.summary.maxSmBytes).toBeLessThan(1.02 * p.summary.meanSmBytes);
      expect(Math.min(...p.summary.perSm.map((s) => s.bytes))).toBeGreaterThan(0.98 * p.summary.meanSmBytes);
    }
    const text = formatStepProgram(p);
    expect(text).toContain('critical path');
    expect(text).toContain('| qkv |');
  });

  it('batch buckets and verify sizes change the slots, the attention and the head rows only', () => {
    const one = build(c);
    const expertBpp = c.expertFormat === 'mxfp4' ? 4.25 / 8 : 2;
    const notSlot = (p: StepProgram) => sum(p, (t) => !isSlot(t));
    for (const [mode, tokens] of (c.large ? [['decode', 8], ['verify', 17]] : [['decode', 2], ['decode', 8], ['verify', 9], ['verify', 17]]) as [StepProgramOptions['mode'], number][]) {
      const p = build(c, { mode, tokens });
      checkProgram(c, p);
      const { numExperts: E, topK: K } = c.spec.moe;
      expect(p.expertSlots).toBe(Math.min(E, tokens * K));
      // Dense weights, router and head are read once whatever the rows.
      expect(notSlot(p)).toBeCloseTo(notSlot(one), 0);
      for (const k of ['qkv', 'o', 'router', 'lm_head'] as const) expect(p.tasks.filter((t) => t.kind === k).length).toBe(one.tasks.filter((t) => t.kind === k).length);
      // Every slot reads a whole expert; expected distinct experts give decodeBytes' weights.
      const moeLayers = c.spec.layers.filter((l) => l.mlp === 'moe').length;
      expect(sum(p, isSlot)).toBeCloseTo(sum(one, isSlot) * (p.expertSlots / one.expertSlots), 0);
      expect(p.summary.bytesExpected).toBeCloseTo(decodeBytes(c.spec, tokens, 0, expertBpp).bytes, 0);
      // Attention: one task a (sequence, KV head) at short context; verify is one sequence of many rows.
      const attn = p.tasks.filter((t) => t.kind === 'attention');
      const seqs = mode === 'decode' ? tokens : 1;
      expect(p.sequences).toBe(seqs);
      expect(attn.length).toBe(seqs * c.spec.attention.numKvHeads * c.spec.numLayers);
      expect(new Set(attn.map((t) => t.args[0])).size).toBe(seqs);
      expect(p.tasks.filter((t) => t.kind === 'argmax').length).toBe(tokens);
      // gate/up tiles: the same tiles in every slot of every MoE layer.
      const perSlot = p.tasks.filter((t) => t.kind === 'gate_up' && t.args[0] === 0).length / Math.max(1, moeLayers);
      expect(p.tasks.filter((t) => t.kind === 'gate_up').length).toBe(moeLayers * p.expertSlots * perSlot);
    }
  });

  it('long contexts split attention over the sequence; KV bytes are the bandwidth model\'s', () => {
    for (const batch of [1, 4]) {
      const ctx = 4096;
      const p = build(c, { tokens: batch, context: ctx });
      checkProgram(c, p);
      const kv = decodeBytes(c.spec, batch, ctx, 1).bytes - decodeBytes(c.spec, batch, 0, 1).bytes;
      expect(p.summary.kvBytes).toBeCloseTo(kv, 0);
      // A full-attention layer (or a sliding one: its window bounds the positions).
      const fullLayer = Math.max(0, c.spec.layers.findIndex((l) => l.slidingWindow === null));
      const visible = Math.min(ctx, c.spec.layers[fullLayer].slidingWindow ?? ctx);
      const splits = p.tasks.filter((t) => t.kind === 'attention' && t.layer === fullLayer && t.args[0] === 0 && t.args[1] === 0).length;
      expect(splits).toBe(Math.max(1, Math.min(Math.ceil(SMS / (batch * c.spec.attention.numKvHeads)), Math.floor(visible / 256))));
      expect(p.tasks.filter((t) => t.kind === 'attn_combine' && t.layer === fullLayer).length).toBe(splits > 1 ? batch * c.spec.attention.numKvHeads : 0);
      // Weights do not depend on the context.
      expect(p.summary.bytes).toBeCloseTo(build(c, { tokens: batch }).summary.bytes, 0);
    }
  });

  it('explicit norms, sampling and the device accounting keep the same graph rules', () => {
    const explicit = build(c, { fuseNorms: false, sampler: 'sample' });
    checkProgram(c, explicit);
    expect(explicit.summary.bytes).toBeCloseTo(bytesPerToken(c.spec, format(c)), 0);
    expect(explicit.tasks.filter((t) => t.kind === 'input_norm').length).toBe(c.spec.numLayers);
    expect(explicit.tasks.filter((t) => t.kind === 'sample').length).toBe(1);
    const device = build(c, { accounting: 'device' });
    checkProgram(c, device);
    // The device keeps expert biases bf16, sinks f32 and gathers the embedding row: within 1 %
    // on real shapes (biases weigh more in the tiny fixtures).
    expect(Math.abs(device.summary.bytes / bytesPerToken(c.spec, format(c)) - 1)).toBeLessThan(c.large ? 0.01 : 0.05);
    const fp8 = build(c, { denseFormat: 'fp8' });
    checkProgram(c, fp8);
    if (c.expertFormat === 'mxfp4') expect(fp8.summary.bytes).toBeCloseTo(bytesPerToken(c.spec, 'mxfp4 experts + fp8'), 0);
  });

  it('exports flat arrays for a native loader', () => {
    const p = build(c, { tokens: 4 });
    const x = exportStepProgram(p);
    const n = p.tasks.length;
    expect(x.kinds.length).toBe(n);
    expect(x.args.length).toBe(n * TASK_ARGS);
    expect(x.waitStart[n]).toBe(x.waitCounter.length);
    expect(x.queueStart[p.queues.length]).toBe(n);
    expect([...x.counterTargets]).toEqual(p.counters.map((k) => k.producers.length));
    for (const t of p.tasks) {
      expect(TASK_KINDS[x.kinds[t.id]]).toBe(t.kind);
      expect(x.waitStart[t.id + 1] - x.waitStart[t.id]).toBe(t.waits.length);
      expect(x.queueTasks[x.queueStart[t.sm] + t.order]).toBe(t.id);
    }
  });
});

describe('step program: inputs', () => {
  it('rejects what the CUDA backend does not run and bad sizes', () => {
    const spec = cases[0].spec;
    const base = { expertFormat: 'mxfp4', denseFormat: 'bf16', mode: 'decode', tokens: 1, smCount: SMS } as const;
    expect(() => buildStepProgram(preset('deepseek-v3'), base)).toThrow(/deepseek_v3/);
    expect(() => buildStepProgram(spec, { ...base, mode: 'verify', tokens: 18 })).toThrow(/2\.\.17/);
    expect(() => buildStepProgram(spec, { ...base, tokens: 0 })).toThrow(/positive/);
    expect(() => buildStepProgram(spec, { ...base, context: 4, mode: 'verify', tokens: 9 })).toThrow(/shorter/);
  });
});
