import fs from 'node:fs/promises';
import path from 'node:path';
import { resolveBackend, importOptional, type BackendChoice } from '../../backends/registry.js';
import type { LoadedModel, StepPlan } from '../../backends/backend.js';
import { MoeflashError } from '../../errors.js';
import { loadModelSpec } from '../../model/config.js';
import { bytesPerToken, footprint } from '../../model/footprint.js';
import type { ModelSpec } from '../../model/spec.js';
import { openWeights } from '../../weights/safetensors.js';
import { validateCheckpoint } from '../../weights/validate-checkpoint.js';
import { FINITE_CHECK_HELP, num, parse, required } from '../args.js';
import { EXPERTS_HELP, PRECISION_HELP, describeExpertLoad, expertLoadOf, expertsFlag, precisionFlag } from '../experts.js';
import { progressBar } from '../progress.js';
import { benchSpeculative, benchSpeculativeHelp } from './bench-speculative.js';
import { median, quantile, rng } from './bench-stats.js';

export const benchHelp = `moeflash bench --model DIR [--backend cuda|cpu] [--batch 1,8,32] [--prompt 512] [--gen 256] [--out FILE.json] [--experts auto|stored|mxfp4] [--precision auto|bf16|f32]
  Prefill and decode throughput at each batch size (random prompts, greedy decoding): prefill
  tokens/s, decode tokens/s and ms a step, the bytes a decode step must read (bandwidth model),
  the achieved GB/s and its share of the device's copy bandwidth measured in the same run, and
  peak memory. Prints the expert format the model was loaded with and a table; writes JSON
  (--out, default bench.json) and a markdown table next to it (same name, .md).
  ${EXPERTS_HELP}
  ${PRECISION_HELP}
  ${FINITE_CHECK_HELP}

${benchSpeculativeHelp}`;

/** What the CUDA backend adds for the benchmark (found at run time, as the registry does). */
interface CudaBenchModule {
  measureCopyBandwidth(bytes?: number, iters?: number): number;
  deviceMemory(): { free: number; total: number };
}

export interface BenchRow {
  batch: number;
  prefillTokensPerSecond: number;
  prefillSeconds: number;
  decodeTokensPerSecond: number;
  msPerStep: number;
  msPerStepP10: number;
  msPerStepP90: number;
  bytesPerStep: number;
  achievedGBps: number;
  shareOfCopyBandwidth: number | null;
  /** Distinct experts a MoE layer reads in one decode step (expected, independent routing). */
  expertsPerLayer: number;
}

/**
 * Bytes one decode step of `batch` sequences at context `ctx` must read: dense weights once, the
 * distinct experts the batch routes to (independent uniform routing: E (1 - (1 - k/E)^B) a layer),
 * the LM head, and each sequence's visible keys and values (bf16).
 */
export function decodeBytes(spec: ModelSpec, batch: number, ctx: number, expertBytesPerParam: number): { bytes: number; expertsPerLayer: number } {
  const f = footprint(spec);
  const moeLayers = spec.layers.filter((l) => l.mlp === 'moe').length;
  const { numExperts: E, topK: k } = spec.moe;
  const perExpert = moeLayers ? f.expertsPerToken / (k * moeLayers) : 0;
  const expertsPerLayer = moeLayers ? E * (1 - Math.pow(1 - k / E, batch)) : 0;
  const head = spec.tieWordEmbeddings ? f.embedding : f.lmHead;
  const dense = (f.attention + f.router + f.denseMlp + head + f.norms) * 2;
  const experts = moeLayers * expertsPerLayer * perExpert * expertBytesPerParam;
  const kvDim = spec.attention.numKvHeads * spec.attention.headDim;
  let kv = 0;
  for (const l of spec.layers) kv += Math.min(ctx, l.slidingWindow ?? ctx) * 2 * kvDim * 2;
  return { bytes: dense + experts + batch * kv, expertsPerLayer };
}

async function runBatch(model: LoadedModel, spec: ModelSpec, batch: number, prompt: number, gen: number, seed: number) {
  const r = rng(seed + batch);
  const seqs = Array.from({ length: batch }, (_, i) => 1000 + i);
  const prompts = seqs.map(() => Array.from({ length: prompt }, () => Math.floor(r() * spec.vocabSize)));
  const next = (res: Awaited<ReturnType<LoadedModel['step']>>) =>
    res.sequences.map((s) => {
      const am = (s as { argmax?: Int32Array }).argmax;
      if (am && am.length) return am[am.length - 1];
      let best = 0;
      const V = spec.vocabSize;
      const l = s.logits.subarray(s.logits.length - V);
      for (let i = 1; i < V; i++) if (l[i] > l[best]) best = i;
      return best;
    });
  // copyLogits: false asks the CUDA backend for device-side arg-max only (other backends ignore it).
  const plan = (tokens: number[][]): StepPlan => ({ sequences: seqs.map((seq, i) => ({ seq, tokens: tokens[i], logits: 'last' as const })), copyLogits: false } as StepPlan);
  const t0 = performance.now();
  let res = await model.step(plan(prompts));
  const prefillSeconds = (performance.now() - t0) / 1e3;
  let tokens = next(res);
  const times: number[] = [];
  for (let g = 0; g < gen; g++) {
    const s = performance.now();
    res = await model.step(plan(tokens.map((t) => [t])));
    times.push(performance.now() - s);
    tokens = next(res);
  }
  for (const s of seqs) model.release(s);
  // The first steps of a batch size capture its CUDA graph: keep them out of the numbers.
  const steady = times.length > 8 ? times.slice(3) : times;
  return { prefillSeconds, times: steady };
}

export async function bench(argv: string[]): Promise<void> {
  if (argv.some((a) => a === '--speculative' || a.startsWith('--speculative='))) return benchSpeculative(argv);
  const { values: v } = parse('bench', argv, {
    model: { type: 'string' }, backend: { type: 'string' }, batch: { type: 'string' }, prompt: { type: 'string' },
    gen: { type: 'string' }, out: { type: 'string' }, seed: { type: 'string' }, experts: { type: 'string' },
    precision: { type: 'string' }, 'skip-finite-check': { type: 'boolean' },
  });
  if (v.help) return void console.log(benchHelp);
  const dir = path.resolve(required('bench', 'model', v.model));
  const batches = String(v.batch ?? '1,8,32').split(',').map((s) => Number(s.trim()));
  if (!batches.every((b) => Number.isInteger(b) && b > 0)) throw new MoeflashError('INVALID_ARGUMENT', `moeflash bench: --batch must be a comma-separated list of positive integers, got '${v.batch}'`);
  const prompt = num('bench', 'prompt', v.prompt, 512)!;
  const gen = num('bench', 'gen', v.gen, 256)!;
  const seed = num('bench', 'seed', v.seed, 1)!;
  const out = path.resolve(v.out ?? 'bench.json');
  const backendChoice = (v.backend ?? 'cuda') as BackendChoice;
  const experts = { ...expertsFlag('bench', v.experts), ...precisionFlag('bench', v.precision) };

  const spec = await loadModelSpec(dir);
  const backend = await resolveBackend(backendChoice);
  const cudaMod = backend.name === 'cuda' ? await importOptional<CudaBenchModule>('@moeflash/cuda-backend') : 'not the CUDA backend';
  const cuda = typeof cudaMod === 'string' ? null : cudaMod;
  const memBefore = cuda?.deviceMemory();
  let minFree = memBefore?.free ?? Infinity;
  const sampleMem = () => {
    if (cuda) minFree = Math.min(minFree, cuda.deviceMemory().free);
  };
  const copyBandwidth = cuda ? cuda.measureCopyBandwidth() : null;

  const weights = await openWeights(dir);
  const t0 = performance.now();
  let model: LoadedModel;
  try {
    // What engine loads check (loadModel): the checkpoint matches its config, and its weights are finite.
    await validateCheckpoint(spec, weights, { checkFinite: !v['skip-finite-check'] });
    model = await backend.load(spec, weights, {
      ...experts,
      onProgress: progressBar(),
      maxSequences: Math.max(...batches),
      maxSequenceLength: prompt + gen + 1,
    });
  } finally {
    await weights.close();
  }
  const loadSeconds = (performance.now() - t0) / 1e3;
  sampleMem();
  const expertFormat = (model as { expertFormat?: string }).expertFormat ?? 'bf16';
  const expertLoad = expertLoadOf(model);
  const precision = (model as { precision?: string }).precision;
  const expertsLine = `experts ${expertLoad ? describeExpertLoad(expertLoad) : expertFormat}${precision ? `, precision ${precision}` : ''}`;
  console.error(`loaded in ${loadSeconds.toFixed(1)} s on ${backend.name}: ${expertsLine}`);
  const expertBytesPerParam = expertFormat === 'mxfp4' ? 4.25 / 8 : 2;

  const rows: BenchRow[] = [];
  let memory: ReturnType<LoadedModel['memory']>;
  let stats: unknown;
  try {
    for (const b of batches) {
      const r = await runBatch(model, spec, b, prompt, gen, seed);
      sampleMem();
      const ms = median(r.times);
      const { bytes, expertsPerLayer } = decodeBytes(spec, b, prompt + gen / 2, expertBytesPerParam);
      const gbps = bytes / (ms / 1e3) / 1e9;
      rows.push({
        batch: b,
        prefillTokensPerSecond: (b * prompt) / r.prefillSeconds,
        prefillSeconds: r.prefillSeconds,
        decodeTokensPerSecond: b / (ms / 1e3),
        msPerStep: ms,
        msPerStepP10: quantile(r.times, 0.1),
        msPerStepP90: quantile(r.times, 0.9),
        bytesPerStep: bytes,
        achievedGBps: gbps,
        shareOfCopyBandwidth: copyBandwidth ? (gbps * 1e9) / copyBandwidth : null,
        expertsPerLayer,
      });
      console.error(`batch ${b}: ${ms.toFixed(3)} ms a step`);
    }
  } finally {
    memory = model.memory();
    stats = (model as { stats?: unknown }).stats;
    await model.dispose();
  }

  const device = backend.devices()[0]?.name ?? backend.name;
  const floorBytes = bytesPerToken(spec, expertFormat === 'mxfp4' ? 'mxfp4 experts + bf16' : 'bf16');
  const result = {
    command: `moeflash bench ${argv.join(' ')}`,
    date: new Date().toISOString(),
    device,
    backend: backend.name,
    model: dir,
    family: spec.family,
    layers: spec.numLayers,
    expertFormat,
    expertLoad,
    prompt,
    gen,
    loadSeconds,
    copyBandwidthGBps: copyBandwidth ? copyBandwidth / 1e9 : null,
    batch1FloorMs: copyBandwidth ? (floorBytes / copyBandwidth) * 1e3 : null,
    batch1WeightBytes: floorBytes,
    memory,
    devicePeakUsedBytes: memBefore ? memBefore.total - minFree : null,
    deviceUsedBeforeLoadBytes: memBefore ? memBefore.total - memBefore.free : null,
    stats,
    rows,
  };
  const table = [
    '| batch | prefill tok/s | decode tok/s | ms/step (p10-p90) | bytes/step | GB/s | % of copy |',
    '| ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows.map(
      (r) =>
        `| ${r.batch} | ${r.prefillTokensPerSecond.toFixed(0)} | ${r.decodeTokensPerSecond.toFixed(1)} | ${r.msPerStep.toFixed(3)} (${r.msPerStepP10.toFixed(3)}-${r.msPerStepP90.toFixed(3)}) | ${(r.bytesPerStep / 1e9).toFixed(2)} GB | ${r.achievedGBps.toFixed(0)} | ${r.shareOfCopyBandwidth === null ? '-' : (100 * r.shareOfCopyBandwidth).toFixed(1) + '%'} |`,
    ),
  ].join('\n');
  const gib = (n: number) => `${(n / 2 ** 30).toFixed(2)} GiB`;
  const md = [
    `# moeflash bench: ${path.basename(dir)} (${spec.family}, ${spec.numLayers} layers, experts ${expertFormat})`,
    '',
    `- device: ${device}; backend ${backend.name}; date ${result.date}`,
    `- ${expertsLine}`,
    `- command: \`${result.command}\``,
    copyBandwidth ? `- copy bandwidth (device-to-device, read + write, same run): ${(copyBandwidth / 1e9).toFixed(0)} GB/s; batch-1 floor ${(result.batch1FloorMs ?? 0).toFixed(3)} ms (${(floorBytes / 1e9).toFixed(2)} GB of weights a token)` : '- copy bandwidth: not measured (not the CUDA backend)',
    `- memory: weights ${gib(memory.weights)}, KV cache ${gib(memory.kvCache)}, activations ${gib(memory.activations)}${result.devicePeakUsedBytes !== null ? `; device peak used ${gib(result.devicePeakUsedBytes)} (before load ${gib(result.deviceUsedBeforeLoadBytes!)})` : ''}`,
    `- prompt ${prompt} random tokens, ${gen} greedy tokens; bytes/step = dense weights + expected distinct experts (independent routing) + KV read at the mean context`,
    '',
    table,
    '',
  ].join('\n');
  console.log(table);
  await fs.writeFile(out, JSON.stringify(result, null, 2) + '\n');
  const mdPath = out.replace(/\.json$/, '') + '.md';
  await fs.writeFile(mdPath, md);
  console.error(`wrote ${out} and ${mdPath}`);
}
