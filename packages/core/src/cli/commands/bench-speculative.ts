import fs from 'node:fs/promises';
import path from 'node:path';
import { importOptional, resolveBackend, type BackendChoice } from '../../backends/registry.js';
import type { DeviceDrafterSpec, LoadedModel, ModelSpec, StepPlan } from '../../index.js';
import { MoeflashError } from '../../errors.js';
import { loadModelSpec } from '../../model/config.js';
import { openWeights } from '../../weights/safetensors.js';
import { num, parse, required } from '../args.js';
import { precisionFlag } from '../experts.js';
import { progressBar } from '../progress.js';
import { median, rng } from './bench-stats.js';

export const benchSpeculativeHelp = `moeflash bench --speculative dflash --model DIR --draft DIR [--accept TAU] [--blocks 1,2,4,8,16] [--batch 1,8] [--prompt 128] [--gen 128] [--out FILE.json]
  DFlash rounds on the backend (the drafter attached to the target: draft, verify and acceptance
  in one call a round) against plain decoding of the same model in the same run. Per batch and
  block size B: ms a round, ms of a verify step of B + 1 tokens alone, tokens a round, tokens/s
  and the speed-up; every row checks that the output equals plain greedy decoding.
  --accept TAU  set the acceptance: the drafter still runs (its cost), but its proposals are
                replaced by the target's own greedy continuation, corrupted so that a round emits
                TAU tokens on average (min(B + 1, TAU)); the table then says the acceptance was set.
                Without it the drafter's own proposals are verified (acceptance earned).`;

interface SpeculativeModule {
  loadDflashConfig(dir: string): Promise<unknown>;
  deviceDrafterSpec(cfg: unknown, src: Awaited<ReturnType<typeof openWeights>>, target: ModelSpec): DeviceDrafterSpec;
}

export interface SpeculativeRow {
  batch: number;
  blockSize: number;
  acceptance: 'set' | 'earned';
  msPerRound: number;
  msVerify: number;
  tokensPerRound: number;
  tokensPerSecond: number;
  plainTokensPerSecond: number;
  speedup: number;
  lossless: boolean;
}

type Model = LoadedModel & { stats?: { graphSteps: number; eagerCalls: number } };

/** Greedy plain decoding: every sequence's next `gen` tokens and the median ms a step. */
async function plainRun(m: Model, seqs: number[], prompts: number[][], gen: number) {
  const sample = (seq: number) => ({ params: { temperature: 0 }, key: { seed: 0, seq, position: 0 } });
  let res = await m.step({ sequences: seqs.map((seq, i) => ({ seq, tokens: prompts[i], logits: 'none' as const, sample: sample(seq) })) });
  const out = seqs.map((_, i) => [res.sequences[i].sampled!]);
  const times: number[] = [];
  for (let g = 1; g < gen; g++) {
    const t0 = performance.now();
    res = await m.step({ sequences: seqs.map((seq, i) => ({ seq, tokens: [out[i][g - 1]], logits: 'none' as const, sample: sample(seq) })) });
    times.push(performance.now() - t0);
    res.sequences.forEach((s, i) => out[i].push(s.sampled!));
  }
  for (const s of seqs) m.release(s);
  return { out, ms: median(times.slice(Math.min(3, times.length - 1))) };
}

/** Milliseconds of one verify-sized step (B + 1 tokens a sequence), the cache rolled back after. */
async function verifyMs(m: Model, seqs: number[], b: number, vocab: number): Promise<number> {
  const times: number[] = [];
  for (let r = 0; r < 8; r++) {
    const lens = seqs.map((s) => m.length(s));
    const t0 = performance.now();
    await m.step({ sequences: seqs.map((seq, i) => ({ seq, tokens: Array.from({ length: b + 1 }, (_, j) => (i * 31 + j * 7 + r) % vocab), logits: 'none' as const, sample: { params: { temperature: 0 }, key: { seed: 0, seq, position: 0 } } })) });
    times.push(performance.now() - t0);
    seqs.forEach((s, i) => m.truncate(s, lens[i]));
  }
  return median(times.slice(2));
}

/**
 * How many drafts a round keeps so that rounds emit `tau` tokens on average: k accepted of b
 * drafted emits k + 1; a fraction of the rounds keep one more than the floor.
 */
export function acceptedFor(tau: number, b: number, round: number): number {
  const want = Math.max(0, tau - 1);
  const lo = Math.floor(want);
  const frac = want - lo;
  // Spread the rounds that keep one more evenly (a low-discrepancy sequence).
  const extra = ((round * 0.6180339887) % 1) < frac ? 1 : 0;
  return Math.min(b, lo + extra);
}

export async function benchSpeculative(argv: string[]): Promise<void> {
  const { values: v } = parse('bench', argv, {
    speculative: { type: 'string' }, model: { type: 'string' }, draft: { type: 'string' }, accept: { type: 'string' },
    blocks: { type: 'string' }, batch: { type: 'string' }, prompt: { type: 'string' }, gen: { type: 'string' },
    out: { type: 'string' }, backend: { type: 'string' }, precision: { type: 'string' }, seed: { type: 'string' },
  });
  if (v.help) return void console.log(benchSpeculativeHelp);
  if (v.speculative !== 'dflash') throw new MoeflashError('INVALID_ARGUMENT', `moeflash bench: --speculative takes dflash (got '${v.speculative}')`);
  const dir = path.resolve(required('bench', 'model', v.model));
  const draftDir = path.resolve(required('bench', 'draft', v.draft));
  const tau = v.accept === undefined ? null : num('bench', 'accept', v.accept)!;
  if (tau !== null && !(tau >= 1 && tau <= 17)) throw new MoeflashError('INVALID_ARGUMENT', `moeflash bench: --accept is tokens a round, from 1 to 17 (got ${v.accept})`);
  const list = (s: string, what: string) => {
    const xs = s.split(',').map((x) => Number(x.trim()));
    if (!xs.every((x) => Number.isInteger(x) && x > 0)) throw new MoeflashError('INVALID_ARGUMENT', `moeflash bench: --${what} must be a comma-separated list of positive integers, got '${s}'`);
    return xs;
  };
  const blocks = list(v.blocks ?? '1,2,4,8,16', 'blocks');
  const batches = list(v.batch ?? '1', 'batch');
  const prompt = num('bench', 'prompt', v.prompt, 128)!;
  const gen = num('bench', 'gen', v.gen, 128)!;
  const seed = num('bench', 'seed', v.seed, 1)!;
  const out = path.resolve(v.out ?? 'bench-speculative.json');

  const spec = await loadModelSpec(dir);
  const backend = await resolveBackend((v.backend ?? 'cuda') as BackendChoice);
  const sp = await importOptional<SpeculativeModule>('@moeflash/speculative');
  if (typeof sp === 'string') throw new MoeflashError('BACKEND_UNAVAILABLE', `moeflash bench --speculative needs ${sp}`);
  const weights = await openWeights(dir);
  let model: Model;
  try {
    model = (await backend.load(spec, weights, {
      ...precisionFlag('bench', v.precision),
      onProgress: progressBar(),
      maxSequences: Math.max(...batches),
      maxSequenceLength: prompt + gen + 2 * Math.max(...blocks) + 2,
      maxStepTokens: Math.max(256, Math.max(...batches) * (Math.max(...blocks) + 1)),
    })) as Model;
  } finally {
    await weights.close();
  }
  if (!model.attachDrafter) throw new MoeflashError('BACKEND_UNAVAILABLE', `the ${backend.name} backend runs no drafter itself (attachDrafter); bench --speculative measures device rounds (use --backend cuda)`);
  const cfg = await sp.loadDflashConfig(draftDir);
  const src = await openWeights(draftDir);
  let drafterBytes = 0;
  try {
    drafterBytes = (await model.attachDrafter(sp.deviceDrafterSpec(cfg, src, spec))).bytes;
  } finally {
    await src.close();
  }
  const V = spec.vocabSize;
  const rows: SpeculativeRow[] = [];
  try {
    for (const batch of batches) {
      const r = rng(seed + batch);
      const seqs = Array.from({ length: batch }, (_, i) => 2000 + i);
      const prompts = seqs.map(() => Array.from({ length: prompt }, () => Math.floor(r() * V)));
      await plainRun(model, seqs, prompts, Math.min(gen, 16)); // warm-up (graphs)
      const plain = await plainRun(model, seqs, prompts, gen);
      const plainTps = batch / (plain.ms / 1e3);
      console.error(`batch ${batch}: plain ${plain.ms.toFixed(3)} ms a step, ${plainTps.toFixed(1)} tokens/s`);
      for (const b of blocks) {
        for (let pass = 0; pass < 2; pass++) {
          // pass 0 warms up (captures the round's graph), pass 1 is measured.
          const pre = await model.step({ sequences: seqs.map((seq, i) => ({ seq, tokens: prompts[i], logits: 'none' as const, absorb: true, sample: { params: { temperature: 0 }, key: { seed: 0, seq, position: 0 } } })) });
          const got = seqs.map((_, i) => [pre.sequences[i].sampled!]);
          const times: number[] = [];
          let rounds = 0;
          let emitted = 0;
          let round = 0;
          while (got.some((g) => g.length < gen)) {
            const live = seqs.map((_, i) => i).filter((i) => got[i].length < gen);
            const plan: StepPlan = {
              sequences: live.map((i) => {
                const n = got[i].length;
                let forced: number[] | undefined;
                if (tau !== null) {
                  const keep = acceptedFor(tau, b, round);
                  forced = Array.from({ length: b }, (_, j) => {
                    const t = plain.out[i][n + j] ?? 0;
                    return j < keep ? t : (t + 1) % V;
                  });
                }
                return { seq: seqs[i], tokens: [got[i][n - 1]], logits: 'none' as const, absorb: true, speculate: { blockSize: b, forced } };
              }),
            };
            const t0 = performance.now();
            const res = await model.step(plan);
            times.push(performance.now() - t0);
            round++;
            res.sequences.forEach((s, k) => {
              const e = s.speculation!.emitted;
              got[live[k]].push(...e);
              rounds++;
              emitted += e.length;
            });
          }
          const lossless = got.every((g, i) => g.slice(0, gen).every((t, j) => t === plain.out[i][j]));
          const vms = pass === 1 ? await verifyMs(model, seqs, b, V) : 0;
          for (const s of seqs) model.release(s);
          if (pass === 0) continue;
          const total = times.reduce((a, x) => a + x, 0);
          const row: SpeculativeRow = {
            batch,
            blockSize: b,
            acceptance: tau === null ? 'earned' : 'set',
            msPerRound: median(times),
            msVerify: vms,
            tokensPerRound: emitted / rounds,
            tokensPerSecond: got.reduce((n, g) => n + Math.min(gen, g.length) - 1, 0) / (total / 1e3),
            plainTokensPerSecond: plainTps,
            speedup: 0,
            lossless,
          };
          row.speedup = row.tokensPerSecond / plainTps;
          rows.push(row);
          console.error(`batch ${batch} B=${b}: ${row.msPerRound.toFixed(3)} ms a round (verify alone ${vms.toFixed(3)}), ${row.tokensPerRound.toFixed(2)} tokens a round, ${row.tokensPerSecond.toFixed(1)} tokens/s, ${row.speedup.toFixed(2)}x${lossless ? '' : ', OUTPUT DIFFERS FROM PLAIN GREEDY'}`);
        }
      }
    }
  } finally {
    await model.dispose();
  }
  const device = backend.devices()[0]?.name ?? backend.name;
  const result = {
    command: `moeflash bench ${argv.join(' ')}`,
    date: new Date().toISOString(),
    device,
    model: dir,
    draft: draftDir,
    acceptance: tau === null ? 'earned by the drafter on random prompts' : `set by the benchmark: ${tau} tokens a round (forced proposals)`,
    precision: (model as { precision?: string }).precision ?? null,
    drafterBytes,
    prompt,
    gen,
    rows,
  };
  const table = [
    '| batch | B | acceptance | ms a round | ms verify alone | tokens a round | tokens/s | plain tokens/s | speed-up | = plain greedy |',
    '| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |',
    ...rows.map((r) => `| ${r.batch} | ${r.blockSize} | ${r.acceptance} | ${r.msPerRound.toFixed(3)} | ${r.msVerify.toFixed(3)} | ${r.tokensPerRound.toFixed(2)} | ${r.tokensPerSecond.toFixed(1)} | ${r.plainTokensPerSecond.toFixed(1)} | ${r.speedup.toFixed(2)}x | ${r.lossless ? 'yes' : 'NO'} |`),
  ].join('\n');
  const md = [
    `# moeflash bench --speculative dflash: ${path.basename(dir)} with ${path.basename(draftDir)}`,
    '',
    `- device: ${device}; date ${result.date}; precision ${result.precision ?? '-'}`,
    `- command: \`${result.command}\``,
    `- acceptance: ${result.acceptance}`,
    `- prompt ${prompt} random tokens, ${gen} greedy tokens a sequence; drafter on the device: ${(drafterBytes / 2 ** 20).toFixed(1)} MiB`,
    '',
    table,
    '',
  ].join('\n');
  await fs.writeFile(out, JSON.stringify(result, null, 2) + '\n');
  await fs.writeFile(out.replace(/\.json$/, '') + '.md', md);
  console.log(table);
}
