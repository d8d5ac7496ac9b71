/**
 * `moeflash quantize` and `moeflash quant-report`. The `moeflash` CLI of @moeflash/core finds these
 * through {@link cliCommands} when this package is installed.
 *
 * @module
 */

import { writeFile } from 'node:fs/promises';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { MoeflashError, type BackendChoice } from '@moeflash/core';
import { convertCheckpoint, type ConvertProgress, type DenseFormat, type ExpertFormat } from './convert.js';
import type { Mxfp4ScaleRule } from './mxfp4.js';
import { formatReport, quantReport, readReportText } from './report.js';

/** A CLI command: `fn` runs it with the arguments after its name; `help`'s second line is its summary. */
export interface CliCommand {
  fn: (argv: string[]) => Promise<void>;
  help: string;
}

type Options = NonNullable<ParseArgsConfig['options']>;

function parse(command: string, argv: string[], options: Options): Record<string, string | boolean | undefined> {
  try {
    const { values } = parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: false, strict: true });
    return values as Record<string, string | boolean | undefined>;
  } catch (e) {
    throw new MoeflashError('INVALID_ARGUMENT', `moeflash ${command}: ${(e as Error).message}; see \`moeflash ${command} --help\``);
  }
}

function required(command: string, name: string, v: string | boolean | undefined): string {
  if (typeof v !== 'string' || v === '') {
    throw new MoeflashError('INVALID_ARGUMENT', `moeflash ${command}: --${name} is required; see \`moeflash ${command} --help\``);
  }
  return v;
}

function oneOf<T extends string>(command: string, name: string, v: string | boolean | undefined, allowed: readonly T[], fallback: T): T {
  if (v === undefined) return fallback;
  if (typeof v !== 'string' || !(allowed as readonly string[]).includes(v)) {
    throw new MoeflashError('INVALID_ARGUMENT', `moeflash ${command}: --${name} must be ${allowed.join(' or ')}, got '${String(v)}'`);
  }
  return v as T;
}

function positiveNumber(command: string, name: string, v: string | boolean | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (typeof v !== 'string' || !(n > 0) || !Number.isFinite(n)) {
    throw new MoeflashError('INVALID_ARGUMENT', `moeflash ${command}: --${name} must be a positive number, got '${String(v)}'`);
  }
  return n;
}

function fmtBytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

/**
 * A progress printer for the converter: a line redrawn in place on a terminal, one line every few
 * seconds otherwise (logs stay short).
 */
export function convertProgressPrinter(stream: NodeJS.WriteStream = process.stderr): (p: ConvertProgress) => void {
  const tty = stream.isTTY === true;
  const every = tty ? 250 : 5000;
  let last = -Infinity;
  return (p) => {
    const done = p.inputBytes >= p.totalInputBytes;
    if (!done && p.elapsedMs - last < every) return;
    last = p.elapsedMs;
    const pct = p.totalInputBytes > 0 ? Math.floor((100 * p.inputBytes) / p.totalInputBytes) : 100;
    const rate = p.elapsedMs > 0 ? p.inputBytes / (p.elapsedMs / 1000) : 0;
    const line = `quantize ${String(pct).padStart(3)}%  ${fmtBytes(p.inputBytes)} / ${fmtBytes(p.totalInputBytes)}  ${(rate / 1e6).toFixed(1)} MB/s  -> ${fmtBytes(p.outputBytes)}  ${p.tensor}`;
    stream.write(tty ? `\r\x1b[K${line}` : `${line}\n`);
    if (tty && done) stream.write('\n');
  };
}

/** Help text of `moeflash quantize`. */
export const quantizeHelp = `moeflash quantize --in DIR --out DIR [--experts mxfp4|keep] [--dense bf16|fp8] [--scale-rule ocp|no-clip] [--shard-size GB] [--force]
  Convert a Hugging Face MoE checkpoint: MXFP4 experts (gpt-oss *_blocks/*_scales layout), bf16 or FP8 dense weights.
  --experts     mxfp4 (default): experts as MXFP4, fused mlp.experts.gate_up_proj_blocks/_scales
                and down_proj_blocks/_scales, from per-expert or fused input; keep: as they are
  --dense       bf16 (default) or fp8: attention and dense-MLP projections as F8_E4M3 weight +
                F32 weight_scale_inv per 128x128 block (HF fine-grained FP8); embeddings, norms,
                routers, biases, sinks and lm_head are never converted
  --scale-rule  ocp (default): OCP MX shared exponent floor(log2 amax) - 2, may clip a block's
                largest values; no-clip: one exponent more where that would clip
  --shard-size  largest output shard in GB (default 5)
  --force       replace an existing --out folder
  Writes into DIR.partial-<pid> and renames it to DIR when complete; progress goes to stderr.`;

/** `moeflash quantize`. */
export async function quantizeCommand(argv: string[]): Promise<void> {
  const v = parse('quantize', argv, {
    in: { type: 'string' },
    out: { type: 'string' },
    experts: { type: 'string' },
    dense: { type: 'string' },
    'scale-rule': { type: 'string' },
    'shard-size': { type: 'string' },
    force: { type: 'boolean' },
  });
  if (v.help) return void console.log(quantizeHelp);
  const input = required('quantize', 'in', v.in);
  const output = required('quantize', 'out', v.out);
  const experts = oneOf<ExpertFormat>('quantize', 'experts', v.experts, ['mxfp4', 'keep'], 'mxfp4');
  const dense = oneOf<DenseFormat>('quantize', 'dense', v.dense, ['bf16', 'fp8'], 'bf16');
  const scaleRule = oneOf<Mxfp4ScaleRule>('quantize', 'scale-rule', v['scale-rule'], ['ocp', 'no-clip'], 'ocp');
  const shardGb = positiveNumber('quantize', 'shard-size', v['shard-size']);
  const res = await convertCheckpoint({
    input,
    output,
    experts,
    dense,
    scaleRule,
    force: v.force === true,
    shardBytes: shardGb === undefined ? undefined : shardGb * 1e9,
    onProgress: convertProgressPrinter(),
    log: (line) => console.error(`quantize: ${line}`),
  });
  console.error(
    `wrote ${res.output}: ${fmtBytes(res.inputBytes)} -> ${fmtBytes(res.outputBytes)} in ${res.seconds.toFixed(1)} s ` +
      `(${(res.bytesPerSecond / 1e6).toFixed(1)} MB/s of input); ${res.mxfp4Layers.length} layer(s) of MXFP4 experts, ` +
      `${res.denseTensors.length} dense tensor(s) ${dense}, ${res.shards.length} shard(s)` +
      (res.keptExpertLayers.length > 0 && experts === 'mxfp4' ? `; experts kept as they were in layer(s) ${res.keptExpertLayers.map((k) => k.layer).join(', ')}` : ''),
  );
}

/** Help text of `moeflash quant-report`. */
export const quantReportHelp = `moeflash quant-report --ref DIR --quant DIR [--text FILE] [--max-tokens N] [--backend cpu|cuda] [--json OUT] [--no-weights]
  Compare a quantized model with its reference: next-token KL, top-1 agreement, perplexity, weight errors.
  --text        text file to score (default: a built-in sample), tokenized with the ref's tokenizer
  --max-tokens  tokens of the text scored at most (default 256)
  --backend     cpu (default) or cuda; both models run on it, one after the other
  --json        also write the full report (every tensor) as JSON to OUT
  --no-weights  skip the per-tensor weight errors (they read both checkpoints once more)`;

/** `moeflash quant-report`. */
export async function quantReportCommand(argv: string[]): Promise<void> {
  const v = parse('quant-report', argv, {
    ref: { type: 'string' },
    quant: { type: 'string' },
    text: { type: 'string' },
    'max-tokens': { type: 'string' },
    backend: { type: 'string' },
    json: { type: 'string' },
    'no-weights': { type: 'boolean' },
  });
  if (v.help) return void console.log(quantReportHelp);
  const ref = required('quant-report', 'ref', v.ref);
  const quant = required('quant-report', 'quant', v.quant);
  const backend = oneOf('quant-report', 'backend', v.backend, ['cpu', 'cuda', 'auto'], 'cpu') as BackendChoice;
  const maxTokens = positiveNumber('quant-report', 'max-tokens', v['max-tokens']);
  if (maxTokens !== undefined && !Number.isInteger(maxTokens)) {
    throw new MoeflashError('INVALID_ARGUMENT', `moeflash quant-report: --max-tokens must be a whole number, got '${String(v['max-tokens'])}'`);
  }
  const textFile = typeof v.text === 'string' ? v.text : undefined;
  const report = await quantReport({
    ref,
    quant,
    text: textFile === undefined ? undefined : await readReportText(textFile),
    textSource: textFile,
    backend,
    maxTokens,
    weights: v['no-weights'] !== true,
    log: (line) => console.error(`quant-report: ${line}`),
  });
  if (typeof v.json === 'string') {
    await writeFile(v.json, JSON.stringify(report, null, 2) + '\n');
    console.error(`wrote ${v.json}`);
  }
  console.log(formatReport(report));
}

/** The commands this package adds to the `moeflash` CLI. */
export const cliCommands: Record<string, CliCommand> = {
  quantize: { fn: quantizeCommand, help: quantizeHelp },
  'quant-report': { fn: quantReportCommand, help: quantReportHelp },
};
