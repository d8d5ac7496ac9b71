import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MoeflashError } from '../src/errors.js';
import { loadTokenizer, TextTokenizer, type StreamDecoder } from '../src/tokenizer/index.js';

const DEMO = fileURLToPath(new URL('./fixtures/demo-tokenizer', import.meta.url));

let tok: TextTokenizer;
let demoJson: Record<string, unknown>;
let demoConfig: Record<string, unknown>;
let scratch: string;

beforeAll(async () => {
  tok = await loadTokenizer(DEMO);
  demoJson = JSON.parse(await readFile(join(DEMO, 'tokenizer.json'), 'utf8'));
  demoConfig = JSON.parse(await readFile(join(DEMO, 'tokenizer_config.json'), 'utf8'));
  scratch = await mkdtemp(join(tmpdir(), 'moeflash-tokenizer-'));
});

afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

/** Text made of pieces that stress a byte-level tokenizer: code, CJK, emoji, specials, controls. */
const mixedText = fc
  .array(
    fc.oneof(
      fc.string({ unit: 'binary' }),
      fc.constantFrom('def ', '    return x\n', '你好，世界', '👍🏽', '🧑‍💻', 'é', 'e\u0301', '\t', '\r\n', '<|im_end|>', '<|im_start|>', '\u0000'),
    ),
    { maxLength: 12 },
  )
  .map((parts) => parts.join(''));

/** Ids that include incomplete UTF-8 (bytes 0x80-0xFF alone), merges and special tokens. */
const randomIds = fc.array(fc.integer({ min: 0, max: 511 }), { maxLength: 60 });

/** Splits `ids` into consecutive chunks at the given cut points and streams them. */
function streamInChunks(decoder: StreamDecoder, ids: number[], cuts: number[]): string[] {
  const points = [...new Set(cuts.map((c) => c % (ids.length + 1)))].sort((a, b) => a - b);
  const deltas: string[] = [];
  let start = 0;
  for (const p of [...points, ids.length]) {
    deltas.push(decoder.push(ids.slice(start, p)));
    start = p;
  }
  deltas.push(decoder.flush());
  return deltas;
}

async function expectLoadError(dir: string, code: string, ...fragments: string[]): Promise<void> {
  const err = await loadTokenizer(dir).then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(MoeflashError);
  expect((err as MoeflashError).code).toBe(code);
  for (const f of fragments) expect((err as MoeflashError).message).toContain(f);
}

describe('demo tokenizer', () => {
  it('has 512 ids with the ChatML special tokens at the end', () => {
    expect(tok.vocabSize).toBe(512);
    expect(tok.tokenToId('<|endoftext|>')).toBe(509);
    expect(tok.tokenToId('<|im_start|>')).toBe(510);
    expect(tok.tokenToId('<|im_end|>')).toBe(511);
    expect(tok.idToToken(511)).toBe('<|im_end|>');
    expect(tok.idToToken(512)).toBeUndefined();
    expect(tok.eosTokenId).toBe(511);
    expect(tok.bosTokenId).toBeNull();
    expect(tok.padTokenId).toBe(509);
    expect(tok.specialTokens).toEqual([
      { id: 509, content: '<|endoftext|>' },
      { id: 510, content: '<|im_start|>' },
      { id: 511, content: '<|im_end|>' },
    ]);
    expect(tok.isSpecial(511)).toBe(true);
    expect(tok.isSpecial(40)).toBe(false);
    expect(tok.chatTemplate).not.toBeNull();
  });

  it('has a token for every byte, so no text needs an unknown token', () => {
    const byteTokens = new Set(Array.from({ length: 256 }, (_, b) => tok.idToToken(b)));
    expect(byteTokens.size).toBe(256);
    expect(byteTokens.has(undefined)).toBe(false);
    const latin1 = String.fromCodePoint(...Array.from({ length: 256 }, (_, i) => i));
    expect(tok.decode(tok.encode(latin1))).toBe(latin1);
  });

  it('encodes like the Rust tokenizers library', () => {
    // Reference ids from `tokenizers` 0.23 (Python bindings) loading the same tokenizer.json.
    expect(tok.encode('def fibonacci(n):\n    return n')).toEqual([276, 286, 455, 40, 110, 270, 261, 281, 328]);
    expect(tok.encode('Grüße 🙂 <|im_end|>')).toEqual([71, 114, 195, 188, 195, 159, 101, 32, 240, 159, 153, 130, 32, 511]);
  });

  it('round-trips arbitrary unicode text', () => {
    fc.assert(
      fc.property(mixedText, (text) => {
        expect(tok.decode(tok.encode(text))).toBe(text);
      }),
      { numRuns: 300 },
    );
  });

  it('encodes the empty string to no ids and decodes no ids to the empty string', () => {
    expect(tok.encode('')).toEqual([]);
    expect(tok.decode([])).toBe('');
  });

  it('skips special tokens on request', () => {
    const ids = tok.encode('<|im_start|>user\nhi<|im_end|>\n');
    expect(ids[0]).toBe(510);
    expect(tok.decode(ids)).toBe('<|im_start|>user\nhi<|im_end|>\n');
    expect(tok.decode(ids, { skipSpecialTokens: true })).toBe('user\nhi\n');
  });

  it('drops ids without a token and rejects ids that are not integers', () => {
    expect(tok.decode([104, 105, 100_000])).toBe('hi');
    expect(() => tok.decode([1.5])).toThrow(MoeflashError);
    expect(() => tok.decode([-1])).toThrow(/not a non-negative integer/);
    expect(() => tok.streamDecoder().push([Number.NaN])).toThrow(MoeflashError);
  });
});

describe('StreamDecoder', () => {
  it('emits deltas that concatenate to decode() for random ids and random chunking', () => {
    fc.assert(
      fc.property(randomIds, fc.array(fc.nat(), { maxLength: 10 }), fc.boolean(), (ids, cuts, skip) => {
        const deltas = streamInChunks(tok.streamDecoder({ skipSpecialTokens: skip }), ids, cuts);
        expect(deltas.join('')).toBe(tok.decode(ids, { skipSpecialTokens: skip }));
      }),
      { numRuns: 500 },
    );
  });

  it('holds back split characters, so no delta of valid text shows U+FFFD', () => {
    fc.assert(
      fc.property(mixedText, (text) => {
        const ids = tok.encode(text);
        const decoder = tok.streamDecoder();
        const deltas = ids.map((id) => decoder.push([id]));
        deltas.push(decoder.flush());
        expect(deltas.join('')).toBe(text);
        for (const d of deltas) expect(d).not.toContain('\uFFFD');
      }),
      { numRuns: 200 },
    );
  });

  it('emits an emoji only once all of its byte tokens have arrived', () => {
    const ids = tok.encode('a🙂');
    expect(ids).toEqual([97, 240, 159, 153, 130]);
    const decoder = tok.streamDecoder();
    expect(ids.map((id) => decoder.push([id]))).toEqual(['a', '', '', '', '🙂']);
    expect(decoder.flush()).toBe('');
  });

  it('emits an unfinished character at flush as decode() shows it', () => {
    const ids = tok.encode('你').slice(0, 2);
    const decoder = tok.streamDecoder();
    expect(decoder.push(ids)).toBe('');
    const rest = decoder.flush();
    expect(rest).toBe(tok.decode(ids));
    expect(rest).toContain('\uFFFD');
  });

  it('stays exact when decode applies the clean-up of tokenization spaces', () => {
    const cleaning = TextTokenizer.fromJSON(demoJson, { ...demoConfig, clean_up_tokenization_spaces: true });
    expect(cleaning.decode(cleaning.encode("a , b . it 's"))).toBe("a, b. it's");
    const pieces = fc.array(fc.constantFrom(' ', '.', ',', "'", 's', 'n', 't', 've', 're', '!', '?', 'x', ' n', "'s"), {
      maxLength: 30,
    });
    fc.assert(
      fc.property(pieces, fc.array(fc.nat(), { maxLength: 8 }), (parts, cuts) => {
        const ids = cleaning.encode(parts.join(''));
        const deltas = streamInChunks(cleaning.streamDecoder(), ids, cuts);
        expect(deltas.join('')).toBe(cleaning.decode(ids));
      }),
      { numRuns: 300 },
    );
    fc.assert(
      fc.property(randomIds, fc.array(fc.nat(), { maxLength: 8 }), (ids, cuts) => {
        expect(streamInChunks(cleaning.streamDecoder(), ids, cuts).join('')).toBe(cleaning.decode(ids));
      }),
      { numRuns: 300 },
    );
  });

  it('starts over after flush', () => {
    const decoder = tok.streamDecoder();
    expect(decoder.push(tok.encode('one'))).toBe('one');
    expect(decoder.flush()).toBe('');
    expect(decoder.push(tok.encode(' two'))).toBe(' two');
  });
});

describe('a SentencePiece-style tokenizer', () => {
  // Llama/Mixtral layout: "▁" for spaces, byte fallback, and a decoder that strips the leading space.
  const pieces = ['<unk>', '<s>', '</s>', ...Array.from({ length: 256 }, (_, i) => `<0x${i.toString(16).toUpperCase().padStart(2, '0')}>`)];
  const words = ['▁', 'a', 'b', 'h', 'i', 'l', 'o', '▁h', '▁hi', 'lo', '▁a', '▁b'];
  const vocab = Object.fromEntries([...pieces, ...words].map((p, i) => [p, i]));
  const spJson = {
    added_tokens: [
      { id: 0, content: '<unk>', special: true, normalized: false, lstrip: false, rstrip: false, single_word: false },
      { id: 1, content: '<s>', special: true, normalized: false, lstrip: false, rstrip: false, single_word: false },
      { id: 2, content: '</s>', special: true, normalized: false, lstrip: false, rstrip: false, single_word: false },
    ],
    normalizer: {
      type: 'Sequence',
      normalizers: [{ type: 'Prepend', prepend: '▁' }, { type: 'Replace', pattern: { String: ' ' }, content: '▁' }],
    },
    pre_tokenizer: null,
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [],
      special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '▁' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE',
      unk_token: '<unk>',
      byte_fallback: true,
      fuse_unk: true,
      vocab,
      merges: ['▁ h', '▁h i', 'l o', '▁ a', '▁ b'],
    },
  };
  const sp = TextTokenizer.fromJSON(spJson, { bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>' });

  it('adds BOS only when asked and round-trips text', () => {
    const ids = sp.encode('hi ab é');
    expect(ids[0]).toBe(1);
    expect(sp.encode('hi', { addSpecialTokens: false })[0]).not.toBe(1);
    expect(sp.decode(ids, { skipSpecialTokens: true })).toBe('hi ab é');
    expect(sp.bosTokenId).toBe(1);
    expect(sp.eosTokenId).toBe(2);
  });

  it('streams with the leading-space rule intact', () => {
    const texts = fc.array(fc.constantFrom('hi', ' hi', ' ', 'lo', ' a', 'b', 'é', '🙂', '中'), { maxLength: 12 });
    fc.assert(
      fc.property(texts, fc.array(fc.nat(), { maxLength: 6 }), (parts, cuts) => {
        const ids = sp.encode(parts.join(''), { addSpecialTokens: false });
        const deltas = streamInChunks(sp.streamDecoder(), ids, cuts);
        expect(deltas.join('')).toBe(sp.decode(ids));
      }),
      { numRuns: 300 },
    );
  });
});

describe('loading errors', () => {
  it('names tokenizer.json when it is missing', async () => {
    const dir = join(scratch, 'empty');
    await expectLoadError(dir, 'TOKENIZER_INVALID', join(dir, 'tokenizer.json'), 'not found');
  });

  it('names tokenizer.json when it is not JSON', async () => {
    const dir = await mkdtemp(join(scratch, 'badjson-'));
    await writeFile(join(dir, 'tokenizer.json'), '{"model": ');
    await expectLoadError(dir, 'TOKENIZER_INVALID', join(dir, 'tokenizer.json'), 'not valid JSON');
  });

  it('names tokenizer.json when it is not a tokenizer', async () => {
    const dir = await mkdtemp(join(scratch, 'nomodel-'));
    await writeFile(join(dir, 'tokenizer.json'), '{"vocab": {}}');
    await expectLoadError(dir, 'TOKENIZER_INVALID', join(dir, 'tokenizer.json'), '"model"');
    await writeFile(join(dir, 'tokenizer.json'), '[1, 2]');
    await expectLoadError(dir, 'TOKENIZER_INVALID', join(dir, 'tokenizer.json'), 'object');
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify({ ...demoJson, decoder: { type: 'NoSuchDecoder' } }));
    await expectLoadError(dir, 'TOKENIZER_INVALID', join(dir, 'tokenizer.json'), 'NoSuchDecoder');
  });

  it('names tokenizer_config.json when it is not JSON, and works without it', async () => {
    const dir = await mkdtemp(join(scratch, 'badconfig-'));
    await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(demoJson));
    const bare = await loadTokenizer(dir);
    expect(bare.encode('def f')).toEqual(tok.encode('def f'));
    expect(bare.eosTokenId).toBeNull();
    expect(bare.chatTemplate).toBeNull();
    // Special added tokens are known without the config.
    expect(bare.specialTokens.map((t) => t.id)).toEqual([509, 510, 511]);
    await writeFile(join(dir, 'tokenizer_config.json'), '{ nope');
    await expectLoadError(dir, 'TOKENIZER_INVALID', join(dir, 'tokenizer_config.json'));
  });
});
