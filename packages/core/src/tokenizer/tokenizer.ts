import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { MoeflashError } from '../errors.js';
import {
  loadChatTemplate,
  missingChatTemplateError,
  type ChatMessage,
  type ChatTemplate,
  type ChatTemplateOptions,
} from './chat.js';
import { describe, isPlainObject, parseJsonObject, readOptionalText, tokenContent } from './files.js';

export interface EncodeOptions {
  /**
   * Let the tokenizer's post-processor add its special tokens (a BOS for Llama-style tokenizers).
   * Default true, as in transformers. Text rendered by a chat template already holds them: encode
   * it with false, or use {@link TextTokenizer.encodeChat}.
   */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Leave out special tokens (`<|im_end|>`, `<|endoftext|>`, ...). Default false. */
  skipSpecialTokens?: boolean;
}

export interface SpecialToken {
  id: number;
  content: string;
}

export interface TokenizerSourceOptions {
  /** Where the tokenizer came from (a path), for error messages. */
  source?: string;
  chatTemplate?: ChatTemplate | null;
}

export type TokenByteEncoding = 'byte_level' | 'byte_fallback' | 'raw';

/** Reads TextTokenizer.byteEncoding off tokenizer.json's decoder (possibly a Sequence of decoders). */
function byteEncodingOf(decoder: unknown): TokenByteEncoding {
  const types: string[] = [];
  const walk = (d: unknown) => {
    if (!isPlainObject(d)) return;
    if (typeof d.type === 'string') types.push(d.type);
    if (Array.isArray(d.decoders)) d.decoders.forEach(walk);
  };
  walk(decoder);
  if (types.includes('ByteLevel')) return 'byte_level';
  if (types.includes('ByteFallback')) return 'byte_fallback';
  return 'raw';
}

/**
 * transformers' `clean_up_tokenization`. Applied after decoding when tokenizer_config.json sets
 * `clean_up_tokenization_spaces`; it is a chain of replacements whose longest pattern is 4 chars.
 */
function cleanUpTokenization(text: string): string {
  return text
    .replace(/ \./g, '.')
    .replace(/ \?/g, '?')
    .replace(/ !/g, '!')
    .replace(/ ,/g, ',')
    .replace(/ ' /g, "'")
    .replace(/ n't/g, "n't")
    .replace(/ 'm/g, "'m")
    .replace(/ 's/g, "'s")
    .replace(/ 've/g, "'ve")
    .replace(/ 're/g, "'re");
}

/**
 * A Hugging Face fast tokenizer (tokenizer.json) with the metadata of tokenizer_config.json:
 * special-token ids, clean-up policy and the chat template.
 */
export class TextTokenizer {
  /** Ids run from 0 to vocabSize - 1 (the base vocabulary plus added tokens). */
  readonly vocabSize: number;
  readonly bosTokenId: number | null;
  readonly eosTokenId: number | null;
  readonly padTokenId: number | null;
  readonly unkTokenId: number | null;
  /** Added tokens marked special, and the tokens tokenizer_config.json names as special. */
  readonly specialTokens: readonly SpecialToken[];
  readonly chatTemplate: ChatTemplate | null;
  /** Path of tokenizer.json (or a label), for messages. */
  readonly source: string;
  /** tokenizer_config.json as read, `{}` when absent. */
  readonly config: Readonly<Record<string, unknown>>;
  /** Whether decode applies transformers' `clean_up_tokenization` (tokenizer_config.json). */
  readonly cleanUpTokenizationSpaces: boolean;
  /**
   * How a token's string in the vocabulary stands for bytes (tokenizer.json's decoder): GPT-2's
   * byte-to-character map (`byte_level`), SentencePiece's `▁` and `<0xXX>` pieces
   * (`byte_fallback`), or the text itself (`raw`). Grammar masks read token bytes through it.
   */
  readonly byteEncoding: TokenByteEncoding;

  private readonly inner: Tokenizer;
  private readonly specialIds: ReadonlySet<number>;

  private constructor(
    inner: Tokenizer,
    config: Record<string, unknown>,
    source: string,
    chatTemplate: ChatTemplate | null,
    byteEncoding: TokenByteEncoding,
  ) {
    this.inner = inner;
    this.byteEncoding = byteEncoding;
    this.config = config;
    this.source = source;
    this.chatTemplate = chatTemplate;
    this.vocabSize = inner.model!.vocab.length;
    // The tokenizers library defaults this to true; transformers no longer does, and models that
    // want it (GPT-2, Llama 3) say so in tokenizer_config.json.
    this.cleanUpTokenizationSpaces = config.clean_up_tokenization_spaces === true;

    const idOf = (field: string): number | null => {
      const content = tokenContent(config[field]);
      return content === undefined ? null : (this.tokenToId(content) ?? null);
    };
    this.bosTokenId = idOf('bos_token');
    this.eosTokenId = idOf('eos_token');
    this.padTokenId = idOf('pad_token');
    this.unkTokenId = idOf('unk_token');

    const special = new Map<number, string>();
    for (const [id, token] of inner.get_added_tokens_decoder()) {
      if (token.special) special.set(id, token.content);
    }
    const named = ['bos_token', 'eos_token', 'pad_token', 'unk_token'].map((k) => tokenContent(config[k]));
    const additional = Array.isArray(config.additional_special_tokens) ? config.additional_special_tokens.map(tokenContent) : [];
    for (const content of [...named, ...additional]) {
      if (content === undefined) continue;
      const id = this.tokenToId(content);
      if (id !== undefined && !special.has(id)) special.set(id, content);
    }
    this.specialTokens = [...special].sort((a, b) => a[0] - b[0]).map(([id, content]) => ({ id, content }));
    this.specialIds = new Set(special.keys());
  }

  /** Builds a tokenizer from already-parsed tokenizer.json and tokenizer_config.json contents. */
  static fromJSON(
    tokenizerJson: unknown,
    tokenizerConfig: Record<string, unknown> = {},
    options: TokenizerSourceOptions = {},
  ): TextTokenizer {
    const source = options.source ?? 'tokenizer.json';
    if (!isPlainObject(tokenizerJson) || !isPlainObject(tokenizerJson.model)) {
      throw new MoeflashError(
        'TOKENIZER_INVALID',
        `${source} is not a Hugging Face tokenizer.json: it has no "model" object`,
      );
    }
    // Hand-written files sometimes leave out the empty stages; the library wants every key present.
    const full = {
      normalizer: null,
      pre_tokenizer: null,
      post_processor: null,
      decoder: null,
      ...tokenizerJson,
      added_tokens: Array.isArray(tokenizerJson.added_tokens) ? tokenizerJson.added_tokens : [],
    };
    let inner: Tokenizer;
    try {
      inner = new Tokenizer(full, tokenizerConfig);
    } catch (err) {
      throw new MoeflashError('TOKENIZER_INVALID', `cannot build a tokenizer from ${source}: ${describe(err)}`, {
        cause: err,
      });
    }
    if (inner.model === null) {
      throw new MoeflashError('TOKENIZER_INVALID', `${source} has no tokenizer model`);
    }
    return new TextTokenizer(inner, tokenizerConfig, source, options.chatTemplate ?? null, byteEncodingOf(full.decoder));
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') {
      throw new MoeflashError('INVALID_ARGUMENT', `encode expects a string, got ${typeof text}`);
    }
    if (text.length === 0) return [];
    return [...this.inner.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids];
  }

  /**
   * Ids without a token (ids of a model's padded vocabulary rows) are dropped, as the Rust
   * tokenizers library does; anything that is not a non-negative integer is an error.
   */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    const text = this.decodeRaw(ids, options.skipSpecialTokens ?? false);
    return this.cleanUpTokenizationSpaces ? cleanUpTokenization(text) : text;
  }

  /** A fresh incremental decoder; use one per generated sequence. */
  streamDecoder(options: DecodeOptions = {}): StreamDecoder {
    return new StreamDecoder(this, options);
  }

  idToToken(id: number): string | undefined {
    return this.inner.id_to_token(id);
  }

  tokenToId(token: string): number | undefined {
    return this.inner.token_to_id(token);
  }

  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  /** Renders messages with the model's chat template; an error names the fix when there is none. */
  applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
    if (this.chatTemplate === null) throw missingChatTemplateError(this.source);
    return this.chatTemplate.apply(messages, options);
  }

  /** Renders and encodes a conversation; the template supplies every special token itself. */
  encodeChat(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }

  /** Decoding without the clean-up pass, which {@link StreamDecoder} applies itself. */
  decodeRaw(ids: readonly number[], skipSpecialTokens: boolean): string {
    if (!Array.isArray(ids)) {
      throw new MoeflashError('INVALID_ARGUMENT', 'decode expects an array of token ids');
    }
    const kept: number[] = [];
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0) {
        throw new MoeflashError('INVALID_ARGUMENT', `token id ${String(id)} is not a non-negative integer`);
      }
      if (this.inner.id_to_token(id) === undefined) continue;
      if (skipSpecialTokens && this.specialIds.has(id)) continue;
      kept.push(id);
    }
    // The library rejects an empty list; an empty sequence decodes to the empty string.
    if (kept.length === 0) return '';
    return this.inner.decode(kept, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
  }

  /** @internal */
  cleanUp(text: string): string {
    return this.cleanUpTokenizationSpaces ? cleanUpTokenization(text) : text;
  }
}

/**
 * Turns generated ids into text deltas as they arrive, such that the deltas of one sequence,
 * concatenated (flush included), equal `decode(allIds)`.
 *
 * A byte-level BPE token can end in the middle of a UTF-8 character; the decoder then shows
 * U+FFFD at the end, so text is held back until the tail decodes cleanly. Decoding restarts from a
 * small window of already-emitted tokens rather than from the start, which keeps each push cheap
 * and gives decoders that look at neighbours (SentencePiece's leading-space rule) their context.
 */
export class StreamDecoder {
  private ids: number[] = [];
  /** Start of the context window in `ids`: tokens before `read` whose text was already emitted. */
  private prefix = 0;
  /** First token whose text has not been emitted. */
  private read = 0;
  private readonly skip: boolean;

  constructor(
    private readonly tokenizer: TextTokenizer,
    options: DecodeOptions = {},
  ) {
    this.skip = options.skipSpecialTokens ?? false;
  }

  /** Adds generated ids; returns the text that is now final (often '', never text taken back). */
  push(ids: readonly number[]): string {
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0) {
        throw new MoeflashError('INVALID_ARGUMENT', `token id ${String(id)} is not a non-negative integer`);
      }
      this.ids.push(id);
    }
    if (this.read === this.ids.length) return '';
    const raw = this.tokenizer.decodeRaw(this.ids.slice(this.prefix), this.skip);
    if (!this.settled(raw)) return '';
    const delta = this.deltaFrom(raw);
    // The window slides: the tokens just emitted become the context of the next push.
    this.ids = this.ids.slice(this.read);
    this.prefix = 0;
    this.read = this.ids.length;
    return delta;
  }

  /** Emits whatever is held back (an unfinished character decodes as U+FFFD) and starts over. */
  flush(): string {
    let delta = '';
    if (this.read < this.ids.length) {
      delta = this.deltaFrom(this.tokenizer.decodeRaw(this.ids.slice(this.prefix), this.skip));
    }
    this.ids = [];
    this.prefix = 0;
    this.read = 0;
    return delta;
  }

  private deltaFrom(raw: string): string {
    const before = this.tokenizer.cleanUp(this.tokenizer.decodeRaw(this.ids.slice(this.prefix, this.read), this.skip));
    return this.tokenizer.cleanUp(raw).slice(before.length);
  }

  /**
   * True when later tokens cannot change the text decoded so far. A trailing U+FFFD may be an
   * unfinished character. With clean-up on, every pattern starts with a space and is at most 4
   * chars long, so a space among the last 3 chars could still join a pattern with what follows.
   */
  private settled(raw: string): boolean {
    if (raw.endsWith('\uFFFD')) return false;
    return !this.tokenizer.cleanUpTokenizationSpaces || !raw.slice(-3).includes(' ');
  }
}

/**
 * Loads tokenizer.json (required), tokenizer_config.json (optional) and the chat template of a
 * Hugging Face model folder.
 */
export async function loadTokenizer(dir: string): Promise<TextTokenizer> {
  const tokenizerText = await readOptionalText(join(dir, 'tokenizer.json'), 'TOKENIZER_INVALID');
  const configText = await readOptionalText(join(dir, 'tokenizer_config.json'), 'TOKENIZER_INVALID');
  return tokenizerFromTexts(dir, tokenizerText, configText);
}

/**
 * {@link loadTokenizer} from the texts of tokenizer.json and tokenizer_config.json (null: the file
 * does not exist) of the model folder `dir`, named in errors; a `chat_template.jinja` in `dir`
 * is still read from disk.
 */
export async function tokenizerFromTexts(dir: string, tokenizerText: string | null, configText: string | null): Promise<TextTokenizer> {
  const jsonPath = join(dir, 'tokenizer.json');
  const tokenizerJson = tokenizerText === null ? null : parseJsonObject(tokenizerText, jsonPath, 'TOKENIZER_INVALID');
  if (tokenizerJson === null) {
    throw new MoeflashError(
      'TOKENIZER_INVALID',
      `tokenizer file not found: ${jsonPath}. moeflash reads the fast-tokenizer format; to write it ` +
        `for a model that only has a slow tokenizer, run in Python: ` +
        `AutoTokenizer.from_pretrained(path).save_pretrained(path)`,
    );
  }
  const configPath = join(dir, 'tokenizer_config.json');
  const config = configText === null ? {} : parseJsonObject(configText, configPath, 'TOKENIZER_INVALID');
  const chatTemplate = await loadChatTemplate(dir, config);
  return TextTokenizer.fromJSON(tokenizerJson, config, { source: jsonPath, chatTemplate });
}
