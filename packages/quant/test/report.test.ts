import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import {
  cliCommands,
  compareLogits,
  convertCheckpoint,
  formatReport,
  quantReport,
  SAMPLE_TEXT,
  type QuantReport,
} from '../src/index.js';
import { tempDir, writeTinyCheckpoint } from './models.js';

const dirs: string[] = [];
function temp(label: string): string {
  const d = tempDir(label);
  dirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

describe('compareLogits', () => {
  it('is zero KL, full agreement and equal perplexity for identical logits', () => {
    const V = 5;
    const logits = Float32Array.from({ length: 3 * V }, (_, i) => Math.sin(i));
    const c = compareLogits(logits, logits, [0, 1, 2], V);
    expect(c).toMatchObject({ positions: 3, klMean: 0, klMax: 0, top1Agreement: 1 });
    expect(c.perplexityRef).toBe(c.perplexityQuant);
  });

  it('matches a hand computation', () => {
    // Position 0: p = softmax([0, ln 3]) = [1/4, 3/4], q = softmax([ln 3, 0]) = [3/4, 1/4].
    const ref = Float32Array.of(0, Math.log(3), 0, 0);
    const quant = Float32Array.of(Math.log(3), 0, 0, 0);
    const c = compareLogits(ref, quant, [0, 1], 2);
    const kl0 = 0.25 * Math.log(0.25 / 0.75) + 0.75 * Math.log(0.75 / 0.25);
    expect(c.klMean).toBeCloseTo(kl0 / 2, 6);
    expect(c.klMax).toBeCloseTo(kl0, 6);
    expect(c.klMaxPosition).toBe(0);
    expect(c.top1Agreement).toBe(0.5); // position 0 disagrees; position 1 ties at token 0 for both
    // Next token after position 0 is 1: p = 3/4, q = 1/4.
    expect(c.perplexityRef).toBeCloseTo(4 / 3, 5);
    expect(c.perplexityQuant).toBeCloseTo(4, 5);
  });

  it('refuses logits of the wrong size', () => {
    expect(() => compareLogits(new Float32Array(4), new Float32Array(6), [0, 1], 2)).toThrow(/expected 2 x 2/);
  });
});

describe('quantReport', () => {
  let ref: string;
  let quant: string;
  let report: QuantReport;
  beforeAll(async () => {
    ref = temp('ref');
    await writeTinyCheckpoint(ref, 'mixtral/per-expert', { seed: 9 });
    quant = path.join(temp('quant'), 'm');
    await convertCheckpoint({ input: ref, output: quant, dense: 'fp8' });
    report = await quantReport({ ref, quant, maxTokens: 64 });
  });

  it('scores the built-in text with the model tokenizer', () => {
    expect(report.schema).toBe('moeflash.quant-report.v1');
    expect(report.text).toMatchObject({ source: 'built-in sample', tokens: 64, tokenizer: path.resolve(ref) });
    expect(report.backend).toBe('cpu');
    expect(SAMPLE_TEXT.length).toBeGreaterThan(1000);
  });

  it('gives small but non-zero divergence and sane perplexities', () => {
    const L = report.logits;
    expect(L.positions).toBe(64);
    expect(L.klMean).toBeGreaterThan(0);
    expect(L.klMean).toBeLessThan(0.2);
    expect(L.klMax).toBeGreaterThanOrEqual(L.klMean);
    expect(L.top1Agreement).toBeGreaterThan(0.5);
    expect(L.perplexityRef).toBeGreaterThan(1);
    expect(Math.abs(Math.log(L.perplexityQuant / L.perplexityRef))).toBeLessThan(0.3);
  });

  it('gives the relative error of every quantized tensor, by role, with both scale rules for experts', () => {
    const w = report.weights!;
    const roles = w.byRole.map((r) => `${r.role}/${r.format}`).sort();
    expect(roles).toEqual(['experts.down/mxfp4', 'experts.gate_up/mxfp4', 'self_attn.k_proj/fp8', 'self_attn.o_proj/fp8', 'self_attn.q_proj/fp8', 'self_attn.v_proj/fp8']);
    // 2 layers: 2 expert tensors and 4 projections each.
    expect(w.tensors.length).toBe(12);
    for (const t of w.tensors) {
      if (t.format === 'mxfp4') {
        // E2M1 keeps ~1 mantissa bit: a Gaussian weight moves by roughly a tenth of its size.
        expect(t.relError).toBeGreaterThan(0.05);
        expect(t.relError).toBeLessThan(0.2);
        expect(t.rules!.ocp).toBeCloseTo(t.relError, 12);
        expect(t.refName).toMatch(/block_sparse_moe\.experts/);
      } else {
        expect(t.relError).toBeGreaterThan(0.005);
        expect(t.relError).toBeLessThan(0.05);
      }
    }
    expect(['ocp', 'no-clip']).toContain(w.betterRule);
    const table = formatReport(report);
    expect(table).toMatch(/KL\(ref \|\| quant\)/);
    expect(table).toMatch(/experts\.gate_up\s+mxfp4/);
    expect(table).toMatch(/top-1 agreement/);
  });

  it('of a model against itself: zero divergence, nothing quantized', async () => {
    const r = await quantReport({ ref, quant: ref, maxTokens: 16 });
    expect(r.logits.klMax).toBe(0);
    expect(r.logits.top1Agreement).toBe(1);
    expect(r.weights!.tensors).toEqual([]);
    expect(formatReport(r)).toMatch(/no quantized tensors/);
  });

  it('uses synthetic ids for models without a tokenizer, and refuses text then', async () => {
    const a = temp('notok');
    await writeTinyCheckpoint(a, 'gpt_oss/bf16', { seed: 4 });
    for (const f of ['tokenizer.json', 'tokenizer_config.json']) fs.rmSync(path.join(a, f));
    const b = path.join(temp('notokq'), 'm');
    await convertCheckpoint({ input: a, output: b });
    const lines: string[] = [];
    const r = await quantReport({ ref: a, quant: b, maxTokens: 32, weights: false, log: (l) => lines.push(l) });
    expect(r.text).toMatchObject({ tokens: 32, tokenizer: null });
    expect(r.weights).toBeNull();
    expect(lines.join('\n')).toMatch(/pseudo-random token ids/);
    await expect(quantReport({ ref: a, quant: b, text: 'hello' })).rejects.toThrow(/no|neither.*tokenizer/);
  });

  it('refuses two unrelated models', async () => {
    const other = temp('other');
    await writeTinyCheckpoint(other, 'gpt_oss/bf16');
    await expect(quantReport({ ref, quant: other })).rejects.toThrow(/is not a conversion of/);
  });
});

describe('CLI commands', () => {
  it('each help text has a one-line summary on its second line', () => {
    for (const [name, c] of Object.entries(cliCommands)) {
      const lines = c.help.split('\n');
      expect(lines[0]).toMatch(new RegExp(`^moeflash ${name} `));
      expect(lines[1].trim().length).toBeGreaterThan(20);
      expect(lines[1].trim().length).toBeLessThan(120);
    }
    expect(Object.keys(cliCommands).sort()).toEqual(['quant-report', 'quantize']);
  });

  it('quantize validates its options with messages that name them', async () => {
    const q = cliCommands.quantize.fn;
    await expect(q([])).rejects.toThrow(/--in is required/);
    await expect(q(['--in', 'a'])).rejects.toThrow(/--out is required/);
    await expect(q(['--in', 'a', '--out', 'b', '--dense', 'fp16'])).rejects.toThrow(/--dense must be bf16 or fp8, got 'fp16'/);
    await expect(q(['--in', 'a', '--out', 'b', '--scale-rule', 'max'])).rejects.toThrow(/--scale-rule must be ocp or no-clip/);
    await expect(q(['--in', 'a', '--out', 'b', '--shard-size', '0'])).rejects.toThrow(/--shard-size must be a positive number/);
    await expect(q(['--bogus'])).rejects.toThrow(/moeflash quantize: .*bogus.*--help/);
    const r = cliCommands['quant-report'].fn;
    await expect(r(['--ref', 'a'])).rejects.toThrow(/--quant is required/);
    await expect(r(['--ref', 'a', '--quant', 'b', '--backend', 'tpu'])).rejects.toThrow(/--backend must be/);
    await expect(r(['--ref', 'a', '--quant', 'b', '--max-tokens', '2.5'])).rejects.toThrow(/whole number/);
  });

  it('quantize and quant-report run end to end and write JSON', async () => {
    const input = temp('cli');
    await writeTinyCheckpoint(input, 'qwen3_moe/fused', { seed: 21 });
    const out = path.join(temp('cliout'), 'm');
    const err = vi.spyOn(process.stderr, 'write').mockImplementation(() => true);
    const errLog = vi.spyOn(console, 'error').mockImplementation(() => {});
    const log = vi.spyOn(console, 'log').mockImplementation(() => {});
    try {
      await cliCommands.quantize.fn(['--in', input, '--out', out, '--dense', 'fp8', '--scale-rule', 'no-clip']);
      expect(errLog.mock.calls.flat().join('\n')).toMatch(/wrote .*MB\/s of input/);
      const json = path.join(temp('json'), 'r.json');
      const textFile = path.join(temp('text'), 't.txt');
      fs.writeFileSync(textFile, 'def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n');
      await cliCommands['quant-report'].fn(['--ref', input, '--quant', out, '--json', json, '--text', textFile]);
      const rep = JSON.parse(fs.readFileSync(json, 'utf8')) as QuantReport;
      expect(rep.text.source).toBe(textFile);
      expect(rep.quant.quantization?.dense?.method).toBe('fp8');
      expect(log.mock.calls.flat().join('\n')).toMatch(/perplexity/);
      await expect(cliCommands.quantize.fn(['--in', input, '--out', out])).rejects.toThrow(/already exists/);
    } finally {
      err.mockRestore();
      errLog.mockRestore();
      log.mockRestore();
    }
  });
});
