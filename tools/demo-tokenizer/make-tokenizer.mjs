#!/usr/bin/env node
// Writes the tokenizer files of the bundled demo model (packages/core/test/fixtures/demo-tokenizer; tests pair it with synthesized tiny models): a GPT-2 style
// byte-level BPE tokenizer with 512 ids, trained on corpus.txt, plus its tokenizer_config.json
// (ChatML chat template) and generation_config.json.
//
//   node tools/demo-tokenizer/make-tokenizer.mjs [outDir]
//
// The output is deterministic: rerunning the script on the same corpus gives identical files.

import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const outDir = resolve(process.argv[2] ?? join(here, '..', '..', 'packages', 'core', 'test', 'fixtures', 'demo-tokenizer'));

// The demo model's embedding has exactly this many rows.
const VOCAB_SIZE = 512;
// Qwen puts its special tokens after the learned vocabulary, in this order.
const SPECIAL_TOKENS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>'];
const MERGEABLE = VOCAB_SIZE - 256 - SPECIAL_TOKENS.length;

// GPT-2's pre-tokenization: words keep their leading space, digits and punctuation runs split off.
const PRE_TOKENIZE = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

/**
 * GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes stand for
 * themselves, the rest are shifted above U+00FF, so every token is a readable string.
 */
function bytesToUnicode() {
  const printable = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const map = new Array(256);
  for (const b of printable) map[b] = String.fromCharCode(b);
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    if (map[b] === undefined) map[b] = String.fromCharCode(256 + shifted++);
  }
  return map;
}

const BYTE_SYMBOLS = bytesToUnicode();
const encoder = new TextEncoder();

function toSymbols(piece) {
  return Array.from(encoder.encode(piece), (b) => BYTE_SYMBOLS[b]);
}

/** Word -> frequency, each word a list of byte symbols. */
function countWords(text) {
  const counts = new Map();
  for (const piece of text.match(PRE_TOKENIZE) ?? []) {
    counts.set(piece, (counts.get(piece) ?? 0) + 1);
  }
  return [...counts].map(([piece, count]) => ({ symbols: toSymbols(piece), count }));
}

/**
 * Classic BPE training: repeatedly merge the most frequent adjacent pair. Ties go to the pair
 * that sorts first, so the result does not depend on Map iteration order. Training stops when the
 * vocabulary is full; a merge can rebuild a token that exists already, so merges may outnumber
 * the tokens they add.
 */
function train(words, newTokens) {
  const vocab = new Set(BYTE_SYMBOLS);
  const merges = [];
  let added = 0;
  while (added < newTokens) {
    const pairs = new Map();
    for (const { symbols, count } of words) {
      for (let i = 0; i + 1 < symbols.length; i++) {
        const key = symbols[i] + ' ' + symbols[i + 1];
        pairs.set(key, (pairs.get(key) ?? 0) + count);
      }
    }
    let best = null;
    let bestCount = 0;
    for (const [key, count] of pairs) {
      if (count > bestCount || (count === bestCount && key < best)) {
        best = key;
        bestCount = count;
      }
    }
    if (best === null) {
      throw new Error(`the corpus is too small: only ${added} of ${newTokens} merges could be learned`);
    }
    const [left, right] = best.split(' ');
    const merged = left + right;
    merges.push(best);
    if (!vocab.has(merged)) {
      vocab.add(merged);
      added++;
    }
    for (const word of words) {
      const s = word.symbols;
      const out = [];
      for (let i = 0; i < s.length; i++) {
        if (i + 1 < s.length && s[i] === left && s[i + 1] === right) {
          out.push(merged);
          i++;
        } else {
          out.push(s[i]);
        }
      }
      word.symbols = out;
    }
  }
  return merges;
}

function buildVocab(merges) {
  const vocab = {};
  let next = 0;
  for (let b = 0; b < 256; b++) vocab[BYTE_SYMBOLS[b]] = next++;
  for (const merge of merges) {
    const token = merge.replace(' ', '');
    if (!(token in vocab)) vocab[token] = next++;
  }
  return vocab;
}

const byteLevel = (addPrefixSpace, trimOffsets) => ({
  type: 'ByteLevel',
  add_prefix_space: addPrefixSpace,
  trim_offsets: trimOffsets,
  use_regex: true,
});

function tokenizerJson(vocab, merges, specialIds) {
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: SPECIAL_TOKENS.map((content) => ({
      id: specialIds[content],
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    // No normalizer: any text, NFC or not, encodes and decodes back to itself.
    normalizer: null,
    pre_tokenizer: byteLevel(false, true),
    post_processor: byteLevel(true, false),
    decoder: byteLevel(true, true),
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: '',
      end_of_word_suffix: '',
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
}

function tokenizerConfig(specialIds, chatTemplate) {
  const addedTokensDecoder = {};
  for (const content of SPECIAL_TOKENS) {
    addedTokensDecoder[String(specialIds[content])] = {
      content,
      lstrip: false,
      normalized: false,
      rstrip: false,
      single_word: false,
      special: true,
    };
  }
  return {
    add_bos_token: false,
    add_prefix_space: false,
    added_tokens_decoder: addedTokensDecoder,
    additional_special_tokens: ['<|im_start|>', '<|im_end|>'],
    bos_token: null,
    chat_template: chatTemplate,
    clean_up_tokenization_spaces: false,
    eos_token: '<|im_end|>',
    errors: 'replace',
    model_max_length: 4096,
    pad_token: '<|endoftext|>',
    split_special_tokens: false,
    tokenizer_class: 'PreTrainedTokenizerFast',
    unk_token: null,
  };
}

function generationConfig(specialIds) {
  return {
    bos_token_id: null,
    do_sample: true,
    eos_token_id: [specialIds['<|im_end|>'], specialIds['<|endoftext|>']],
    pad_token_id: specialIds['<|endoftext|>'],
    temperature: 0.8,
    top_p: 0.95,
  };
}

function main() {
  const corpus = readFileSync(join(here, 'corpus.txt'), 'utf8');
  const chatTemplate = readFileSync(join(here, 'chat_template.jinja'), 'utf8').trimEnd();

  const merges = train(countWords(corpus), MERGEABLE);
  const vocab = buildVocab(merges);
  const learned = Object.keys(vocab).length;
  if (learned !== VOCAB_SIZE - SPECIAL_TOKENS.length) {
    throw new Error(`expected ${VOCAB_SIZE - SPECIAL_TOKENS.length} learned tokens, got ${learned}`);
  }
  const specialIds = Object.fromEntries(SPECIAL_TOKENS.map((t, i) => [t, learned + i]));

  mkdirSync(outDir, { recursive: true });
  const write = (name, value) => {
    writeFileSync(join(outDir, name), JSON.stringify(value, null, 2) + '\n');
    console.log(`wrote ${join(outDir, name)}`);
  };
  write('tokenizer.json', tokenizerJson(vocab, merges, specialIds));
  write('tokenizer_config.json', tokenizerConfig(specialIds, chatTemplate));
  write('generation_config.json', generationConfig(specialIds));
  console.log(`vocabulary: ${VOCAB_SIZE} ids (${merges.length} merges); special ids: ${JSON.stringify(specialIds)}`);
}

main();
