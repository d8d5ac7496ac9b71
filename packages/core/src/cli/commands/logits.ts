import fs from 'node:fs/promises';
import type { BackendChoice } from '../../backends/registry.js';
import { loadModel } from '../../engine/load.js';
import { MoeflashError } from '../../errors.js';
import { writeSafetensors } from '../../weights/safetensors-writer.js';
import { FINITE_CHECK_HELP, parse, required } from '../args.js';
import { EXPERTS_HELP, PRECISION_HELP, describeExpertLoad, expertLoadOf, expertsFlag, precisionFlag } from '../experts.js';
import { progressBar } from '../progress.js';

export const logitsHelp = `moeflash logits --model DIR --input IDS.json --output OUT.safetensors [--backend cpu|cuda] [--experts auto|stored|mxfp4] [--precision auto|bf16|f32]
  Logits at every position of each sequence, each from an empty cache.
  IDS.json: {"sequences": [[int, ...], ...]}. OUT holds one F32 tensor logits.{i} of shape
  [len_i, vocab] per sequence: the logits at every position of sequence i from an empty cache.
  ${EXPERTS_HELP}
  ${PRECISION_HELP}
  ${FINITE_CHECK_HELP}
    (compare with reference logits: --experts stored)`;

export async function parseSequences(file: string, vocab: number): Promise<number[][]> {
  let json: unknown;
  try {
    json = JSON.parse(await fs.readFile(file, 'utf8'));
  } catch (e) {
    throw new MoeflashError('INVALID_ARGUMENT', `cannot read ${file} as JSON: ${(e as Error).message}`);
  }
  const seqs = (json as { sequences?: unknown }).sequences;
  if (!Array.isArray(seqs) || seqs.length === 0) {
    throw new MoeflashError('INVALID_ARGUMENT', `${file}: expected {"sequences": [[int, ...], ...]} with at least one sequence`);
  }
  seqs.forEach((s, i) => {
    if (!Array.isArray(s) || s.length === 0 || !s.every((t) => Number.isInteger(t) && t >= 0 && t < vocab)) {
      throw new MoeflashError('INVALID_ARGUMENT', `${file}: sequences[${i}] must be a non-empty array of token ids in [0, ${vocab})`);
    }
  });
  return seqs as number[][];
}

export async function logits(argv: string[]): Promise<void> {
  const { values: v } = parse('logits', argv, {
    model: { type: 'string' }, input: { type: 'string' }, output: { type: 'string' }, backend: { type: 'string' },
    experts: { type: 'string' }, precision: { type: 'string' }, 'skip-finite-check': { type: 'boolean' },
  });
  if (v.help) return void console.log(logitsHelp);
  const input = required('logits', 'input', v.input);
  const output = required('logits', 'output', v.output);
  const h = await loadModel({
    model: required('logits', 'model', v.model),
    backend: (v.backend ?? 'cpu') as BackendChoice,
    onProgress: progressBar(),
    checkFiniteWeights: !v['skip-finite-check'],
    backendOptions: { ...expertsFlag('logits', v.experts), ...precisionFlag('logits', v.precision) },
  });
  try {
    const seqs = await parseSequences(input, h.spec.vocabSize);
    const res = await h.model.step({ sequences: seqs.map((tokens, i) => ({ seq: i, tokens, logits: 'all' as const })) });
    const tensors: Record<string, { dtype: 'F32'; shape: number[]; data: Float32Array }> = {};
    res.sequences.forEach((s, i) => {
      tensors[`logits.${i}`] = { dtype: 'F32', shape: [seqs[i].length, h.spec.vocabSize], data: s.logits };
    });
    await writeSafetensors(output, tensors, { producer: 'moeflash logits', backend: h.backend.name });
    const el = expertLoadOf(h.model);
    console.error(`wrote ${seqs.length} sequence(s) of logits to ${output} (${h.backend.name} backend${el ? `, experts ${describeExpertLoad(el)}` : ''})`);
  } finally {
    await h.model.dispose();
  }
}
