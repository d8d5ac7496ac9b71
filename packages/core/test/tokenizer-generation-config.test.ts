import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MoeflashError } from '../src/errors.js';
import { loadGenerationConfig, loadTokenizer, parseGenerationConfig, stopTokenIds } from '../src/tokenizer/index.js';

const DEMO = fileURLToPath(new URL('./fixtures/demo-tokenizer', import.meta.url));

let scratch: string;
beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'moeflash-genconfig-'));
});
afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

async function folderWith(text: string): Promise<string> {
  const dir = await mkdtemp(join(scratch, 'model-'));
  await writeFile(join(dir, 'generation_config.json'), text);
  return dir;
}

describe('loadGenerationConfig', () => {
  it('reads the demo model: both end tokens and its sampling defaults', async () => {
    expect(await loadGenerationConfig(DEMO)).toEqual({
      source: join(DEMO, 'generation_config.json'),
      eosTokenIds: [511, 509],
      padTokenId: 509,
      doSample: true,
      temperature: 0.8,
      topP: 0.95,
    });
  });

  it('gives an empty config for a folder without the file', async () => {
    expect(await loadGenerationConfig(join(scratch, 'nothing-here'))).toEqual({ source: null, eosTokenIds: [] });
  });

  it('accepts a single eos id, nulls and unknown fields', () => {
    const g = parseGenerationConfig(
      {
        eos_token_id: 2,
        bos_token_id: 1,
        pad_token_id: null,
        top_k: 20,
        min_p: 0,
        max_new_tokens: 128,
        max_length: 4096,
        repetition_penalty: 1.1,
        do_sample: false,
        transformers_version: '4.57.0',
      },
      'g.json',
    );
    expect(g).toEqual({
      source: 'g.json',
      eosTokenIds: [2],
      bosTokenId: 1,
      topK: 20,
      minP: 0,
      maxNewTokens: 128,
      maxLength: 4096,
      repetitionPenalty: 1.1,
      doSample: false,
    });
    expect(parseGenerationConfig({ eos_token_id: [7, 7, 3] }, null).eosTokenIds).toEqual([7, 3]);
  });

  it('names the file and the field when a value is wrong', async () => {
    const dir = await folderWith(JSON.stringify({ temperature: 'hot' }));
    const err = await loadGenerationConfig(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MoeflashError);
    expect((err as MoeflashError).code).toBe('CONFIG_INVALID');
    expect((err as MoeflashError).message).toContain(join(dir, 'generation_config.json'));
    expect((err as MoeflashError).message).toContain('"temperature"');
    expect(() => parseGenerationConfig({ eos_token_id: [1, -2] }, 'g.json')).toThrow(/eos_token_id/);
    expect(() => parseGenerationConfig({ top_p: 1.5 }, 'g.json')).toThrow(/top_p/);
    expect(() => parseGenerationConfig({ max_new_tokens: 2.5 }, 'g.json')).toThrow(/max_new_tokens/);
  });

  it('names the file when it is not JSON', async () => {
    const dir = await folderWith('{"eos_token_id": [1,');
    await expect(loadGenerationConfig(dir)).rejects.toThrow(join(dir, 'generation_config.json'));
  });
});

describe('stopTokenIds', () => {
  it('merges config.json, generation_config.json and the tokenizer without repeats', async () => {
    const tok = await loadTokenizer(DEMO);
    const gen = await loadGenerationConfig(DEMO);
    expect(stopTokenIds([509], gen, tok)).toEqual([509, 511]);
    expect(stopTokenIds(509, gen, tok)).toEqual([509, 511]);
    expect(stopTokenIds(undefined, gen, tok)).toEqual([511, 509]);
    expect(stopTokenIds(null, null, tok)).toEqual([511]);
    expect(stopTokenIds([2, 3], { eosTokenIds: [3, 4] }, { eosTokenId: null })).toEqual([2, 3, 4]);
    expect(stopTokenIds([], null, null)).toEqual([]);
  });

  it('rejects ids that are not token ids', () => {
    expect(() => stopTokenIds([1.5], null, null)).toThrow(MoeflashError);
  });
});
