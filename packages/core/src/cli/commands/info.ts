import path from 'node:path';
import { importOptional } from '../../backends/registry.js';
import { loadModelSpec } from '../../model/config.js';
import type { ModelSpec } from '../../model/spec.js';
import { bytesPerToken, footprint, WEIGHT_FORMATS } from '../../model/footprint.js';
import type { WeightSource } from '../../weights/tensor.js';
import { openWeights } from '../../weights/safetensors.js';
import { parse, required } from '../args.js';
import { EXPERTS_HELP, describeExpertLoad, expertsFlag, type ExpertLoadReport } from '../experts.js';
import { fmtBytes } from '../progress.js';

export const infoHelp = `moeflash info --model DIR [--json] [--experts auto|stored|mxfp4]
  Parameters, experts, the format the CUDA backend loads the experts in (with --experts as a load
  would be given it), and the bytes a batch-1 decode step reads in each weight format.
  ${EXPERTS_HELP}`;

interface CudaPlanModule {
  planExpertLoad(spec: ModelSpec, src: WeightSource, experts?: string): ExpertLoadReport;
}

/** What a CUDA load would do with the experts, or why that cannot be told here. */
async function cudaExperts(spec: ModelSpec, weights: WeightSource | null, experts: string | undefined): Promise<ExpertLoadReport | string> {
  if (!weights) return 'weights not readable';
  const mod = await importOptional<CudaPlanModule>('@moeflash/cuda-backend');
  if (typeof mod === 'string') return mod;
  if (typeof mod.planExpertLoad !== 'function') return '@moeflash/cuda-backend does not export planExpertLoad (a mismatched version?)';
  try {
    return mod.planExpertLoad(spec, weights, experts);
  } catch (e) {
    return (e as Error).message;
  }
}

const g = (n: number) => (n >= 1e9 ? `${(n / 1e9).toFixed(2)} G` : n >= 1e6 ? `${(n / 1e6).toFixed(2)} M` : `${(n / 1e3).toFixed(1)} k`);

export async function info(argv: string[]): Promise<void> {
  const { values: v } = parse('info', argv, { model: { type: 'string' }, json: { type: 'boolean' }, experts: { type: 'string' } });
  if (v.help) return void console.log(infoHelp);
  const dir = path.resolve(required('info', 'model', v.model));
  const spec = await loadModelSpec(dir);
  const f = footprint(spec);
  const weights = await openWeights(dir).catch(() => null);
  const stored = weights ? weights.names().reduce((s, n) => s + weights.info(n).byteLength, 0) : null;
  let cuda: ExpertLoadReport | string;
  try {
    cuda = await cudaExperts(spec, weights, expertsFlag('info', v.experts).experts);
  } finally {
    await weights?.close();
  }
  const perToken = Object.fromEntries(Object.keys(WEIGHT_FORMATS).map((k) => [k, bytesPerToken(spec, k as keyof typeof WEIGHT_FORMATS)]));
  if (v.json) {
    const cudaExpertLoad = typeof cuda === 'string' ? { unavailable: cuda } : cuda;
    console.log(JSON.stringify({ family: spec.family, footprint: f, bytesPerToken: perToken, storedBytes: stored, cudaExpertLoad, spec }, null, 2));
    return;
  }
  const a = spec.attention;
  const moeLayers = spec.layers.filter((l) => l.mlp === 'moe').length;
  const lines = [
    `model       ${dir}`,
    `family      ${spec.family}, ${spec.numLayers} layers (${moeLayers} MoE), hidden ${spec.hiddenSize}, vocab ${spec.vocabSize}`,
    `attention   ${a.numHeads} heads, ${a.numKvHeads} kv heads, head dim ${a.headDim}, rope ${a.rope.type} (theta ${a.rope.theta})` +
      `${a.sinks ? ', sinks' : ''}${spec.layers.some((l) => l.slidingWindow !== null) ? `, sliding window ${spec.layers.find((l) => l.slidingWindow !== null)!.slidingWindow}` : ''}`,
    `experts     ${spec.moe.numExperts} per layer, top-${spec.moe.topK} (${spec.moe.rule}), expert width ${spec.moe.intermediateSize}`,
    `parameters  ${g(f.total)} total: attention ${g(f.attention)}, experts ${g(f.expertsTotal)} (${g(f.expertsPerToken)} routed a token), embedding ${g(f.embedding)}, lm head ${g(f.lmHead || f.embedding)}${spec.tieWordEmbeddings ? ' (tied)' : ''}`,
    `stored      ${stored === null ? 'weights not readable' : fmtBytes(stored)}${spec.quantization ? ` (quantization: ${spec.quantization.method})` : ''}`,
    `on cuda     experts ${typeof cuda === 'string' ? `unknown (${cuda.split('\n')[0]})` : describeExpertLoad(cuda)}`,
    `bytes read per token at batch 1:`,
    ...Object.entries(perToken).map(([k, b]) => `  ${k.padEnd(22)} ${fmtBytes(b)}`),
  ];
  console.log(lines.join('\n'));
}
