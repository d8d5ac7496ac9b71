import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { loadModel, openWeights } from '@moeflash/core';
import { logits } from '../src/cli/commands/logits.js';
import { info } from '../src/cli/commands/info.js';
import { run } from '../src/cli/commands/run.js';
import { tinyModel } from './helpers.js';

let dir: string;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-cli-'));

beforeAll(async () => {
  dir = await tinyModel('gpt_oss');
});
afterEach(() => vi.restoreAllMocks());

function capture(stream: 'stdout' | 'stderr' | 'log') {
  const out: string[] = [];
  if (stream === 'log') vi.spyOn(console, 'log').mockImplementation((...a) => void out.push(a.join(' ') + '\n'));
  else vi.spyOn(process[stream], 'write').mockImplementation(((s: string) => (out.push(String(s)), true)) as never);
  return () => out.join('');
}

describe('moeflash logits', () => {
  it('writes logits.{i} [len_i, vocab] equal to running each sequence from an empty cache', async () => {
    const seqs = [[1, 2, 3, 4, 5], [300, 301], [7, 8, 9, 10, 11, 12, 13, 14, 15]];
    fs.writeFileSync(path.join(tmp, 'ids.json'), JSON.stringify({ sequences: seqs }));
    const outFile = path.join(tmp, 'out.safetensors');
    capture('stderr');
    await logits(['--model', dir, '--input', path.join(tmp, 'ids.json'), '--output', outFile, '--backend', 'cpu']);
    const out = await openWeights(outFile);
    const h = await loadModel({ model: dir, backend: 'cpu' });
    for (let i = 0; i < seqs.length; i++) {
      expect(out.info(`logits.${i}`).shape).toEqual([seqs[i].length, h.spec.vocabSize]);
      expect(out.info(`logits.${i}`).dtype).toBe('F32');
      const alone = await h.model.step({ sequences: [{ seq: 100 + i, tokens: seqs[i], logits: 'all' }] });
      expect(Array.from(await out.readFloat32(`logits.${i}`))).toEqual(Array.from(alone.sequences[0].logits));
    }
    await out.close();
  });

  it('rejects malformed input files with the file named', async () => {
    const bad = path.join(tmp, 'bad.json');
    fs.writeFileSync(bad, JSON.stringify({ sequences: [[1, 2], [99999]] }));
    capture('stderr');
    await expect(logits(['--model', dir, '--input', bad, '--output', path.join(tmp, 'x.safetensors')])).rejects.toThrow(/bad\.json: sequences\[1\]/);
    fs.writeFileSync(bad, '{not json');
    await expect(logits(['--model', dir, '--input', bad, '--output', path.join(tmp, 'x.safetensors')])).rejects.toThrow(/as JSON/);
  });

  it('requires its flags', async () => {
    await expect(logits(['--model', dir])).rejects.toThrow(/--input is required/);
    await expect(logits(['--model', dir, '--input', 'x.json', '--output', 'y', '--experts', 'fp4'])).rejects.toThrow(/--experts must be auto, stored or mxfp4/);
  });
});

describe('moeflash info', () => {
  it('prints parameters and bytes per token for each weight format', async () => {
    const out = capture('log');
    await info(['--model', dir]);
    const text = out();
    expect(text).toMatch(/family\s+gpt_oss, 2 layers/);
    expect(text).toMatch(/4 per layer, top-4/);
    expect(text).toMatch(/mxfp4 experts \+ fp8/);
  });

  it('says how the CUDA backend loads the experts: quantized on load, as stored, or why not', async () => {
    const golden = path.join(__dirname, 'fixtures', 'golden');
    const line = async (...args: string[]) => {
      const out = capture('log');
      await info(args);
      vi.restoreAllMocks();
      return out().split('\n').find((l) => l.startsWith('on cuda'));
    };
    expect(await line('--model', path.join(golden, 'mixtral_fused'))).toMatch(/experts mxfp4 \(quantized on load from bf16\)/);
    expect(await line('--model', path.join(golden, 'mixtral_fused'), '--experts', 'stored')).toMatch(/experts bf16 \(stored bf16\)/);
    expect(await line('--model', path.join(golden, 'gpt_oss_mxfp4'))).toMatch(/experts mxfp4 \(stored mxfp4\)/);
    expect(await line('--model', path.join(golden, 'mixtral_per_expert'))).toMatch(/experts bf16 \(stored bf16; not quantized: hidden 72/);
    await expect(info(['--model', dir, '--experts', 'fp4'])).rejects.toThrow(/--experts must be auto, stored or mxfp4/);
  });

  it('--json gives the footprint of the bandwidth model', async () => {
    const out = capture('log');
    await info(['--model', dir, '--json']);
    const j = JSON.parse(out());
    expect(j.bytesPerToken['bf16']).toBeGreaterThan(j.bytesPerToken['mxfp4 experts + bf16']);
    expect(j.bytesPerToken['mxfp4 experts + bf16']).toBeGreaterThan(j.bytesPerToken['mxfp4 experts + fp8']);
    expect(j.cudaExpertLoad).toMatchObject({ format: expect.any(String), quantized: expect.any(Boolean) });
  });
});

describe('moeflash run', () => {
  it('streams the prompt and a completion to stdout', async () => {
    const out = capture('stdout');
    capture('stderr');
    await run(['--model', dir, '--prompt', 'def f(x):', '--max-tokens', '5', '--backend', 'cpu', '--temperature', '0']);
    expect(out().startsWith('def f(x):')).toBe(true);
  });
  it('names unknown flags', async () => {
    await expect(run(['--model', dir, '--bogus'])).rejects.toThrow(/bogus/);
  });
});
