/**
 * Compiles output grammars against one model's vocabulary (one compiler an engine, made on the
 * first constrained request). xgrammar precomputes, per grammar, which tokens each of its states
 * can take, so that a step's mask costs tens of microseconds rather than a walk over the
 * vocabulary. Compiled grammars are kept by their text, so requests with one schema compile once.
 */
import { MoeflashError } from '../errors.js';
import type { TextTokenizer } from '../tokenizer/tokenizer.js';
import type { TokenMask } from '../sampling/token-mask.js';
import { jsonTextMask, Utf8Table } from './byte-guards.js';
import type { OutputGrammar } from './response-format.js';
import type { TokenTable } from './token-bytes.js';
import { XgrammarInstance, type XgrCompiledGrammar, type XgrGrammarCompiler } from './xgrammar-binding.js';

/** Compiled grammars kept (each is some kilobytes to a few megabytes of precomputed masks). */
const CACHE_SIZE = 32;

export interface CompiledOutputGrammar {
  readonly instance: XgrammarInstance;
  readonly compiled: XgrCompiledGrammar;
  /** JSON modes: tokens with control bytes are never allowed (byte-guards.ts). */
  readonly json: boolean;
}

interface Session {
  instance: XgrammarInstance;
  compiler: XgrGrammarCompiler;
  cache: Map<string, Promise<XgrCompiledGrammar>>;
}

export class GrammarCompiler {
  readonly utf8: Utf8Table;
  readonly jsonText: TokenMask;
  readonly vocabSize: number;
  private session: Promise<Session> | null = null;

  constructor(
    private readonly tokenizer: TextTokenizer,
    /** The model's tokens as bytes (tokenTable), one entry a logits column. */
    readonly table: TokenTable,
    /** The model's end-of-sequence ids: what a finished grammar allows next (a request may add its own). */
    private readonly stopTokenIds: readonly number[],
  ) {
    this.vocabSize = table.vocabSize;
    this.utf8 = new Utf8Table(this.table);
    this.jsonText = jsonTextMask(this.table);
  }

  async compile(grammar: OutputGrammar): Promise<CompiledOutputGrammar> {
    const session = await this.open();
    const key = JSON.stringify(grammar);
    let compiled = session.cache.get(key);
    if (compiled === undefined) {
      compiled = session.instance.capture(() => compileWith(session.compiler, grammar));
      session.cache.set(key, compiled);
      compiled.catch(() => session.cache.delete(key));
      if (session.cache.size > CACHE_SIZE) {
        const [oldest, entry] = session.cache.entries().next().value!;
        session.cache.delete(oldest);
        void entry.then((g) => g.dispose(), () => {});
      }
    } else {
      // Most recently used last.
      session.cache.delete(key);
      session.cache.set(key, compiled);
    }
    try {
      return { instance: session.instance, compiled: await compiled, json: grammar.kind !== 'ebnf' };
    } catch (err) {
      // An aborted instance is dropped; the next compile starts a fresh copy of the library.
      if (session.instance.aborted) this.session = null;
      throw new MoeflashError('INVALID_ARGUMENT', `${describe(grammar)} cannot be compiled: ${(err as Error).message}. ${fix(grammar)}`, { cause: err });
    }
  }

  private open(): Promise<Session> {
    this.session ??= (async () => {
      let instance: XgrammarInstance;
      try {
        instance = await XgrammarInstance.load();
      } catch (err) {
        this.session = null;
        throw new MoeflashError('BACKEND_UNAVAILABLE', `constrained decoding needs @mlc-ai/web-xgrammar, which failed to load (${String(err)}); reinstall @moeflash/core's dependencies`, { cause: err });
      }
      const vocabType = this.tokenizer.byteEncoding;
      const info = await instance.capture(() =>
        instance.lib.TokenizerInfo.createTokenizerInfo(this.table.encoded, vocabType, false, this.vocabSize, [...this.stopTokenIds]),
      );
      const compiler = await instance.lib.GrammarCompiler.createGrammarCompiler(info, false);
      return { instance, compiler, cache: new Map() };
    })();
    return this.session;
  }
}

function compileWith(compiler: XgrGrammarCompiler, grammar: OutputGrammar): Promise<XgrCompiledGrammar> {
  switch (grammar.kind) {
    case 'json_object':
      return compiler.compileJSONSchema(JSON.stringify({ type: 'object' }), false, -1, [', ', ': '], false);
    case 'json_schema':
      // Compact JSON on one line, as json.dumps writes it: what models are trained to write.
      // strictMode: properties the schema does not list are not generated.
      return compiler.compileJSONSchema(JSON.stringify(grammar.schema), false, -1, [', ', ': '], true);
    case 'ebnf':
      return compiler.compileGrammar(grammar.grammar, grammar.root);
  }
}

function describe(grammar: OutputGrammar): string {
  return grammar.kind === 'ebnf' ? 'the grammar' : grammar.kind === 'json_schema' ? 'responseFormat\'s JSON schema' : 'the JSON object grammar';
}

function fix(grammar: OutputGrammar): string {
  return grammar.kind === 'ebnf'
    ? 'Write it in EBNF with a root rule, e.g. root ::= "yes" | "no"'
    : 'Use JSON Schema keywords xgrammar supports (type, properties, required, items, enum, const, anyOf, $ref, $defs, minimum/maximum, minLength/maxLength, pattern, ...)';
}
