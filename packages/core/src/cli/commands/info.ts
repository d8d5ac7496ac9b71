import path from 'node:path';
import { importOptional } from '../../backends/registry.js';
import { loadModelSpec } from '../../model/config.js';
import type { ModelSpec } from '../../model/spec.js';
import { bytesPerToken, expandedKvValuesPerToken, footprint, kvCacheValuesPerToken, WEIGHT_FORMATS } from '../../model/footprint.js';
import type { WeightSource } from '../../weights/tensor.js';
import { openWeights } from '../../weights/safetensors.js';
import { parse, required } from '../args.js';
import { EXPERTS_HELP, describeExpertLoad, expertsFlag, type ExpertLoadReport } from '../experts.js';
import { fmtBytes } from '../progress.js';

export const infoHelp = `moeflash info --model DIR [--json] [--experts auto|stored|mxfp4]
  Parameters, experts, the format the CUDA backend loads the experts in (with --experts as a load
  would be given it), the KV cache a token takes, and the bytes a batch-1 decode step reads in each
  weight format (weights alone, and with the KV cache of a 4k and a 32k context).
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

/** Contexts whose KV reads `info` adds to the per-token bytes. */
const CONTEXTS = [4096, 32768];

/** The attention line: grouped-query heads, or latent attention's dims. */
function attentionLine(spec: ModelSpec): string {
  const a = spec.attention;
  const m = a.mla;
  const rope = `rope ${a.rope.type} (theta ${a.rope.theta})`;
  if (m) {
    return `${a.numHeads} heads, latent attention (q_lora_rank ${m.qLoraRank ?? 'none'}, kv_lora_rank ${m.kvLoraRank}, ` +
      `qk ${m.qkNopeHeadDim} + ${m.qkRopeHeadDim} rope, v ${m.vHeadDim}), ${rope}, softmax scale ${a.scale.toPrecision(4)}`;
  }
  const window = spec.layers.find((l) => l.slidingWindow !== null)?.slidingWindow;
  return `${a.numHeads} heads, ${a.numKvHeads} kv heads, head dim ${a.headDim}, ${rope}${a.sinks ? ', sinks' : ''}${window ? `, sliding window ${window}` : ''}`;
}

function expertsLine(spec: ModelSpec): string {
  const m = spec.moe;
  const g = m.grouped;
  const rule = g ? `${m.rule}: ${g.topkGroups} of ${g.numGroups} groups, weights x ${g.routedScalingFactor}` : m.rule;
  const shared = m.sharedExperts ? `, ${m.sharedExperts.count} shared` : '';
  return `${m.numExperts} per layer, top-${m.topK} (${rule}), expert width ${m.intermediateSize}${shared}`;
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
  const formats = Object.keys(WEIGHT_FORMATS) as (keyof typeof WEIGHT_FORMATS)[];
  const perToken = Object.fromEntries(formats.map((k) => [k, bytesPerToken(spec, k)]));
  // A bf16 KV cache, read whole by each decode step at these context lengths.
  const atContext = Object.fromEntries(CONTEXTS.map((c) => [c, Object.fromEntries(formats.map((k) => [k, bytesPerToken(spec, k, { context: c })]))]));
  const kvValues = kvCacheValuesPerToken(spec);
  const kvCache = { valuesPerToken: kvValues, bytesPerTokenBf16: kvValues * 2, expandedValuesPerToken: expandedKvValuesPerToken(spec) };
  if (v.json) {
    const cudaExpertLoad = typeof cuda === 'string' ? { unavailable: cuda } : cuda;
    console.log(JSON.stringify({ family: spec.family, footprint: f, bytesPerToken: perToken, bytesPerTokenAtContext: atContext, kvCache, storedBytes: stored, cudaExpertLoad, spec }, null, 2));
    return;
  }
  const moeLayers = spec.layers.filter((l) => l.mlp === 'moe').length;
  const active = f.total - f.expertsTotal + f.expertsPerToken;
  const shared = f.sharedExperts ? `, shared experts ${g(f.sharedExperts)}` : '';
  const compressed = spec.attention.mla
    ? ` (latent rows; keys and values expanded to every head would be ${kvCache.expandedValuesPerToken.toLocaleString('en-US')}, ${(kvCache.expandedValuesPerToken / kvValues).toFixed(0)}x)`
    : '';
  const lines = [
    `model       ${dir}`,
    `family      ${spec.family}, ${spec.numLayers} layers (${moeLayers} MoE), hidden ${spec.hiddenSize}, vocab ${spec.vocabSize}`,
    `attention   ${attentionLine(spec)}`,
    `experts     ${expertsLine(spec)}`,
    `parameters  ${g(f.total)} total, ${g(active)} active a token: attention ${g(f.attention)}, experts ${g(f.expertsTotal)} (${g(f.expertsPerToken)} routed a token)${shared}, embedding ${g(f.embedding)}, lm head ${g(f.lmHead || f.embedding)}${spec.tieWordEmbeddings ? ' (tied)' : ''}`,
    `kv cache    ${kvValues.toLocaleString('en-US')} values a token over ${spec.numLayers} layers, ${fmtBytes(kvCache.bytesPerTokenBf16)} in bf16${compressed}`,
    `stored      ${stored === null ? 'weights not readable' : fmtBytes(stored)}${spec.quantization ? ` (quantization: ${spec.quantization.method})` : ''}`,
    `on cuda     experts ${typeof cuda === 'string' ? `unknown (${cuda.split('\n')[0]})` : describeExpertLoad(cuda)}`,
    `bytes read per token at batch 1 (weights; with the bf16 KV cache of ${CONTEXTS.map((c) => `${c / 1024}k`).join(' / ')} positions):`,
    ...formats.map((k) => `  ${k.padEnd(22)} ${fmtBytes(perToken[k])}  (${CONTEXTS.map((c) => fmtBytes(atContext[c][k])).join(' / ')})`),
  ];
  console.log(lines.join('\n'));
}
