/**
 * Fuzzing the load of a model folder: thousands of mutated checkpoints, config.json,
 * tokenizer.json and tokenizer_config.json files of every family and expert layout (the golden
 * fixtures, the synth presets at small sizes, the bundled model), held in memory and put through
 * the same parsing and validation a load does. A run must end with 0 crashes (errors that are not
 * a MoeflashError with a code), 0 hangs, 0 malformed folders accepted and 0 well-formed ones
 * refused, where checkpoint-mutations.ts says which is which. Each accepted checkpoint is also
 * read by the CPU backend's loader, the tokenizer of each accepted tokenizer mutation encodes,
 * decodes and renders a chat.
 *
 * MOEFLASH_FUZZ_RUNS (default 12000) and MOEFLASH_FUZZ_SEED (default: a fixed seed) reproduce or
 * extend a run; the test prints both with the counts.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { synthesizeModel } from '../src/synth/synth.js';
import { MoeflashError } from '../src/errors.js';
import { parseModelConfigText } from '../src/model/config.js';
import type { ModelSpec } from '../src/model/spec.js';
import { tokenizerFromTexts } from '../src/tokenizer/tokenizer.js';
import { loadModelWeights } from '../src/weights/layouts.js';
import { validateCheckpoint } from '../src/weights/validate-checkpoint.js';
import { memoryOpener } from '../src/weights/byte-source.js';
import { openShardedCheckpoint } from '../src/weights/safetensors.js';
import { GOLDEN, goldenRoot, holdFolder, openHeld } from './checkpoint-builder.js';
import { MUTATORS, Rng, splitFile, prefixOf, type Base, type Mutant } from './checkpoint-mutations.js';
import { repoRoot, TINY } from './helpers.js';

const RUNS = Number(process.env.MOEFLASH_FUZZ_RUNS ?? 12_000);
const SEED = Number(process.env.MOEFLASH_FUZZ_SEED ?? 0x5eed);
/** A mutant still pending after this long counts as a hang. */
const HANG_MS = 5_000;

const demoTokenizer = path.join(repoRoot, 'packages/core/test/fixtures/demo-tokenizer');
const readText = (file: string) => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : null);

/** Synth presets shrunk to test sizes: the real models' layouts (fused bf16, MXFP4, tied head, a dense layer). */
const SYNTH: { name: string; preset: string; mxfp4?: boolean; overrides: Record<string, unknown> }[] = [
  { name: 'synth-tiny-demo', ...TINY.qwen3_moe },
  { name: 'synth-gpt-oss-20b-mxfp4', ...TINY.gpt_oss, mxfp4: true },
  { name: 'synth-gpt-oss-120b-bf16', preset: 'gpt-oss-120b', mxfp4: false, overrides: { ...TINY.gpt_oss.overrides, num_local_experts: 8 } },
  {
    name: 'synth-qwen3-30b-a3b',
    preset: 'qwen3-30b-a3b',
    overrides: { vocab_size: 256, hidden_size: 64, moe_intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, num_experts: 4, num_experts_per_tok: 2, bos_token_id: null, eos_token_id: 255 },
  },
  {
    // FP8 per-expert layout with latent attention, shared experts, one dense layer; an MTP layer
    // declared but not stored.
    name: 'synth-deepseek-v3-fp8',
    preset: 'deepseek-v3',
    overrides: {
      vocab_size: 256, hidden_size: 64, intermediate_size: 96, moe_intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
      num_key_value_heads: 2, q_lora_rank: 24, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 8, v_head_dim: 12,
      n_routed_experts: 4, n_group: 2, topk_group: 1, num_experts_per_tok: 2, first_k_dense_replace: 1, eos_token_id: 255,
    },
  },
];

async function loadBases(): Promise<Base[]> {
  const bases: Base[] = [];
  const tokenizerText = readText(path.join(demoTokenizer, 'tokenizer.json'));
  const tokenizerConfigText = readText(path.join(demoTokenizer, 'tokenizer_config.json'));
  for (const name of GOLDEN) {
    const f = await holdFolder(path.join(goldenRoot, name));
    const indexText = readText(path.join(f.dir, 'model.safetensors.index.json'));
    const shardNames = fs.readdirSync(f.dir).filter((n) => n.endsWith('.safetensors') && n.startsWith('model-'));
    const sharded = indexText === null ? undefined : { indexText, shards: new Map(shardNames.map((n) => [n, new Uint8Array(fs.readFileSync(path.join(f.dir, n)))])) };
    bases.push({ name, family: f.spec.family, tensors: f.tensors, configText: readText(path.join(f.dir, 'config.json'))!, tokenizerText, tokenizerConfigText, sharded });
  }
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-fuzz-'));
  for (const s of SYNTH) {
    const dir = path.join(tmp, s.name);
    await synthesizeModel({ preset: s.preset, overrides: s.overrides, mxfp4Experts: s.mxfp4, out: dir, seed: 3 });
    const f = await holdFolder(dir, s.name);
    bases.push({ name: s.name, family: f.spec.family, tensors: f.tensors, configText: readText(path.join(dir, 'config.json'))!, tokenizerText, tokenizerConfigText });
  }
  fs.rmSync(tmp, { recursive: true, force: true });
  const coder = path.join(repoRoot, 'models/moeflash-tiny-coder');
  const f = await holdFolder(coder);
  bases.push({
    name: 'moeflash-tiny-coder',
    family: f.spec.family,
    tensors: f.tensors,
    configText: readText(path.join(coder, 'config.json'))!,
    tokenizerText: readText(path.join(coder, 'tokenizer.json')),
    tokenizerConfigText: readText(path.join(coder, 'tokenizer_config.json')),
  });
  return bases;
}

/** What a folder's load came to. */
type Outcome = { result: 'accepted' } | { result: 'rejected'; code: string } | { result: 'crash'; error: string } | { result: 'hang' };

/** Loaders this small run the CPU backend's weight reader on what they accept, to show it loads. */
const READ_ACCEPTED_BELOW_BYTES = 4 << 20;

async function exerciseTokenizer(base: Base, m: Mutant): Promise<void> {
  const dir = `/mem/${base.name}`;
  const tok = await tokenizerFromTexts(
    dir,
    m.tokenizerText !== undefined ? m.tokenizerText : base.tokenizerText,
    m.tokenizerConfigText !== undefined ? m.tokenizerConfigText : base.tokenizerConfigText,
  );
  const ids = tok.encode('def f(x):\n    return "é" + x  # <|im_end|>');
  tok.decode(ids);
  const stream = tok.streamDecoder();
  for (const id of ids) stream.push([id]);
  stream.flush();
  if (tok.chatTemplate) tok.applyChatTemplate([{ role: 'user', content: 'hi' }], { addGenerationPrompt: true });
}

async function exerciseCheckpoint(base: Base, m: Mutant, baseFile: ReturnType<typeof prefixedBase>): Promise<void> {
  const dir = `/mem/${base.name}`;
  const spec: ModelSpec = parseModelConfigText(m.configText ?? base.configText, `${dir}/config.json`);
  const file = `${dir}/model.safetensors`;
  const src = m.sharded
    ? await openShardedCheckpoint(dir, `${dir}/model.safetensors.index.json`, m.sharded.indexText, memoryOpener(new Map([...m.sharded.shards].map(([n, segs]) => [`${dir}/${n}`, segs]))))
    : await openHeld(new Map([[file, m.file ?? baseFile.segments]]), dir);
  try {
    await validateCheckpoint(spec, src, { checkFinite: m.checkFinite });
    if (baseFile.bytes < READ_ACCEPTED_BELOW_BYTES) await loadModelWeights(spec, src);
  } finally {
    await src.close();
  }
}

function prefixedBase(base: Base) {
  const { header, data, dataBytes } = splitFile(base.tensors);
  return { segments: [prefixOf(JSON.stringify(header)), ...data], bytes: dataBytes };
}

async function attempt(base: Base, m: Mutant, baseFile: ReturnType<typeof prefixedBase>): Promise<Outcome> {
  const tokenizerOnly = m.tokenizerText !== undefined || m.tokenizerConfigText !== undefined;
  const work = (tokenizerOnly ? exerciseTokenizer(base, m) : exerciseCheckpoint(base, m, baseFile)).then(
    (): Outcome => ({ result: 'accepted' }),
    (e: unknown): Outcome =>
      e instanceof MoeflashError && typeof e.code === 'string' && e.code.length > 0 && e.message.length > 0
        ? { result: 'rejected', code: e.code }
        : { result: 'crash', error: e instanceof Error ? `${e.name}: ${e.message}\n${e.stack?.split('\n').slice(1, 4).join('\n')}` : String(e) },
  );
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<Outcome>((resolve) => (timer = setTimeout(() => resolve({ result: 'hang' }), HANG_MS)));
  try {
    return await Promise.race([work, hang]);
  } finally {
    clearTimeout(timer);
  }
}

interface Counts {
  total: number;
  accepted: number;
  rejected: number;
  crashes: number;
  hangs: number;
  malformedAccepted: number;
  wellFormedRefused: number;
}
const zero = (): Counts => ({ total: 0, accepted: 0, rejected: 0, crashes: 0, hangs: 0, malformedAccepted: 0, wellFormedRefused: 0 });

describe('fuzzing the load of a model folder', () => {
  let bases: Base[];
  beforeAll(async () => {
    bases = await loadBases();
  }, 60_000);

  it(`${RUNS} mutated folders: 0 crashes, 0 hangs, 0 malformed accepted, 0 well-formed refused`, async () => {
    const rng = new Rng(SEED);
    const byKind = new Map<string, Counts>();
    const byBase = new Map<string, Counts>(bases.map((b) => [b.name, zero()]));
    const codes = new Map<string, number>();
    const verdicts = { reject: 0, accept: 0, either: 0 };
    const failures: string[] = [];
    const baseFiles = new Map(bases.map((b) => [b.name, prefixedBase(b)]));
    const t0 = performance.now();

    for (let i = 0; i < RUNS; i++) {
      const base = bases[i % bases.length];
      const usable = base.sharded ? MUTATORS : MUTATORS.filter((x) => !x.sharded);
      let pick = rng.next() * usable.reduce((s, x) => s + x.weight, 0);
      const mutator = usable.find((x) => (pick -= x.weight) < 0) ?? usable[0];
      const m = mutator.make(base, rng);
      const out = await attempt(base, m, baseFiles.get(base.name)!);
      if (!byKind.has(m.kind)) byKind.set(m.kind, zero());
      for (const c of [byKind.get(m.kind)!, byBase.get(base.name)!]) {
        c.total++;
        if (out.result === 'accepted') c.accepted++;
        if (out.result === 'rejected') c.rejected++;
        if (out.result === 'crash') c.crashes++;
        if (out.result === 'hang') c.hangs++;
        if (out.result === 'accepted' && m.verdict === 'reject') c.malformedAccepted++;
        if (out.result === 'rejected' && m.verdict === 'accept') c.wellFormedRefused++;
      }
      if (out.result === 'rejected') codes.set(out.code, (codes.get(out.code) ?? 0) + 1);
      verdicts[m.verdict]++;
      const wrong =
        out.result === 'crash' || out.result === 'hang' || (out.result === 'accepted' && m.verdict === 'reject') || (out.result === 'rejected' && m.verdict === 'accept');
      if (wrong && failures.length < 20) {
        failures.push(`#${i} ${base.name} ${m.kind} (${m.detail}), expected ${m.verdict}: ${out.result}${'code' in out ? ` ${out.code}` : ''}${'error' in out ? ` ${out.error}` : ''}`);
      }
    }
    const seconds = (performance.now() - t0) / 1000;

    const sum = [...byKind.values()].reduce((a, c) => {
      for (const k of Object.keys(a) as (keyof Counts)[]) a[k] += c[k];
      return a;
    }, zero());
    const row = (name: string, c: Counts) =>
      `${name.padEnd(24)} ${String(c.total).padStart(6)} ${String(c.accepted).padStart(8)} ${String(c.rejected).padStart(8)} ${String(c.crashes).padStart(7)} ${String(c.hangs).padStart(5)} ${String(c.malformedAccepted).padStart(9)} ${String(c.wellFormedRefused).padStart(9)}`;
    const head = `${'mutation'.padEnd(24)} ${'total'.padStart(6)} ${'accepted'.padStart(8)} ${'rejected'.padStart(8)} ${'crashes'.padStart(7)} ${'hangs'.padStart(5)} ${'bad-accept'.padStart(9)} ${'bad-refuse'.padStart(9)}`;
    console.log(
      [
        `checkpoint fuzz: ${RUNS} mutated folders in ${seconds.toFixed(1)} s (seed ${SEED}; MOEFLASH_FUZZ_SEED / MOEFLASH_FUZZ_RUNS to change)`,
        head,
        ...[...byKind].sort(([a], [b]) => a.localeCompare(b)).map(([k, c]) => row(k, c)),
        row('all', sum),
        '',
        `${'base'.padEnd(24)} ${head.slice(25)}`,
        ...[...byBase].map(([k, c]) => row(k, c)),
        '',
        `verdicts: ${verdicts.reject} must be rejected, ${verdicts.accept} must be accepted, ${verdicts.either} may go either way (only the kind of error is checked)`,
        `error codes of the rejections: ${[...codes].map(([k, n]) => `${k} ${n}`).join(', ')}`,
      ].join('\n'),
    );

    expect(failures, failures.join('\n')).toEqual([]);
    expect(sum.total).toBe(RUNS);
    // Every kind and every base took part.
    for (const [k, c] of [...byKind, ...byBase]) expect(c.total, k).toBeGreaterThan(0);
  }, 240_000);
});
