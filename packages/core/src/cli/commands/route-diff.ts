import fs from 'node:fs/promises';
import type { RoutingTrace } from '../../backends/backend.js';
import type { BackendChoice } from '../../backends/registry.js';
import { compareRouting, explainFirstDifference, type RoutingComparison } from '../../debug/route-diff.js';
import { loadModel, type ModelHandle } from '../../engine/load.js';
import { MoeflashError } from '../../errors.js';
import { uniform } from '../../sampling/rng.js';
import { parse, num } from '../args.js';
import { EXPERTS_HELP, PRECISION_HELP, expertsFlag, precisionFlag } from '../experts.js';
import { parseSequences } from './logits.js';

export const routeDiffHelp = `moeflash route-diff --model DIR (--input IDS.json | --random LEN [--seed S]) [--backend cuda] [--against cpu] [--json OUT]
  Where a backend's answer parts from the reference's: runs each sequence from an empty cache on
  both backends and prints, per sequence, the logits error per position, every (layer, position)
  whose experts differ with the reference's router margin there, and whether the first
  difference is a near-tie that rounding flipped or a real disagreement.
  --input IDS.json   {"sequences": [[int, ...], ...]} (as moeflash logits)
  --random LEN       one sequence of LEN token ids drawn uniformly (--seed, default 0)
  --backend B        the backend under test (default cuda); --against R the reference (default cpu)
  --near-tie X       margins below X of the logit scale are listed as near-ties (default 1e-5)
  ${EXPERTS_HELP}
  ${PRECISION_HELP}`;

interface Traced {
  logits: Float32Array;
  routing: RoutingTrace;
}

async function traced(h: ModelHandle, seqs: number[][]): Promise<Traced[]> {
  const out: Traced[] = [];
  // One sequence a step, each from an empty cache, so no batching effect enters the comparison.
  for (const [i, tokens] of seqs.entries()) {
    const res = await h.model.step({ sequences: [{ seq: 1000 + i, tokens, logits: 'all', traceRouting: true }] });
    h.model.release(1000 + i);
    const s = res.sequences[0];
    if (!s.routing) throw new MoeflashError('BACKEND_UNAVAILABLE', `the ${h.backend.name} backend does not trace routing (StepSequence.traceRouting)`);
    out.push({ logits: s.logits, routing: s.routing });
  }
  return out;
}

function randomSequence(len: number, vocab: number, seed: number): number[] {
  return Array.from({ length: len }, (_, i) => Math.min(vocab - 1, Math.floor(uniform({ seed, seq: 0, position: i }) * vocab)));
}

function report(i: number, c: RoutingComparison, names: [string, string]): string {
  const lines: string[] = [];
  const worst = c.positionErrors.reduce((b, e, p) => (e > c.positionErrors[b] ? p : b), 0);
  lines.push(
    `sequence ${i} (${c.tokens} tokens): ${names[0]} vs ${names[1]} logits ${c.logitsError.toExponential(2)} relative ` +
      `(worst ${c.positionErrors[worst].toExponential(2)} at position ${worst}), top-1 ${(100 * c.top1).toFixed(1)} %`,
  );
  lines.push(`  routing: ${c.differences.length} of ${c.choices} (layer, position) choices differ`);
  lines.push(`  router error before the first difference, per MoE layer: ${c.routerErrorBeforeFirst.map((e, l) => `L${l} ${e.toExponential(1)}`).filter(Boolean).join(', ')}`);
  for (const d of c.differences.slice(0, 12)) {
    lines.push(
      `  layer ${d.layer} position ${d.position}: ${names[1]} [${d.reference.join(', ')}] ${names[0]} [${d.other.join(', ')}]; ` +
        `${names[1]} margin ${d.margin.toExponential(2)} (${d.relativeMargin.toExponential(1)} of scale), router error ${d.routerError.toExponential(1)}${d.first ? '  <- first' : ''}`,
    );
  }
  if (c.differences.length > 12) lines.push(`  ... and ${c.differences.length - 12} more`);
  if (c.nearTies.length) {
    lines.push(`  near-ties in the reference: ${c.nearTies.map((t) => `L${t.layer} p${t.position} (${t.relativeMargin.toExponential(1)})`).join(', ')}`);
  }
  lines.push(`  per position: ${c.positionErrors.map((e) => e.toExponential(0)).join(' ')}`);
  lines.push(`  => ${explainFirstDifference(c)}`);
  return lines.join('\n');
}

export async function routeDiff(argv: string[]): Promise<void> {
  const { values: v } = parse('route-diff', argv, {
    model: { type: 'string' }, input: { type: 'string' }, random: { type: 'string' }, seed: { type: 'string' },
    backend: { type: 'string' }, against: { type: 'string' }, json: { type: 'string' }, experts: { type: 'string' },
    precision: { type: 'string' }, 'near-tie': { type: 'string' },
  });
  if (v.help) return void console.log(routeDiffHelp);
  if (!v.model) throw new MoeflashError('INVALID_ARGUMENT', 'moeflash route-diff: --model is required; see `moeflash route-diff --help`');
  if (!v.input === !v.random) throw new MoeflashError('INVALID_ARGUMENT', 'moeflash route-diff: give one of --input IDS.json or --random LEN');
  const nearTie = num('route-diff', 'near-tie', v['near-tie'], 1e-5)!;
  const backendOptions = { ...expertsFlag('route-diff', v.experts), ...precisionFlag('route-diff', v.precision) };
  const names: [string, string] = [v.backend ?? 'cuda', v.against ?? 'cpu'];
  const test = await loadModel({ model: v.model, backend: names[0] as BackendChoice, backendOptions });
  let ref: ModelHandle | null = null;
  try {
    ref = await loadModel({ model: v.model, backend: names[1] as BackendChoice, backendOptions });
    const spec = test.spec;
    let seqs: number[][];
    if (v.input) seqs = await parseSequences(v.input, spec.vocabSize);
    else {
      const len = num('route-diff', 'random', v.random)!;
      if (!Number.isInteger(len) || len < 1) throw new MoeflashError('INVALID_ARGUMENT', `moeflash route-diff: --random must be a positive integer, got '${v.random}'`);
      seqs = [randomSequence(len, spec.vocabSize, num('route-diff', 'seed', v.seed, 0)!)];
    }
    const a = await traced(test, seqs);
    const b = await traced(ref, seqs);
    const dims = { vocab: spec.vocabSize, numExperts: spec.moe.numExperts, topK: spec.moe.topK };
    const comparisons = seqs.map((_, i) => compareRouting(b[i], a[i], dims, nearTie));
    const precision = (test.model as { precision?: string }).precision;
    console.log(`${v.model}: ${names[0]}${precision ? ` (precision ${precision})` : ''} against ${names[1]}`);
    comparisons.forEach((c, i) => console.log(report(i, c, names)));
    if (v.json) {
      await fs.writeFile(v.json, JSON.stringify({ model: v.model, backend: names[0], reference: names[1], precision, sequences: comparisons }, null, 1));
    }
  } finally {
    await test.model.dispose();
    await ref?.model.dispose();
  }
}
