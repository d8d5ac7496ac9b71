/**
 * The one typed boundary to xgrammar (the grammar engine of the large serving systems), through
 * its WebAssembly build @mlc-ai/web-xgrammar. Nothing else in moeflash touches the library.
 *
 * Two things about that package decide how it is loaded:
 * - lib/index.js is a UMD script that calls `require` and reads `__filename`, but its package.json
 *   says `"type": "module"`, so Node's ESM loader (and `require`, which then refuses it) cannot
 *   run it. It is compiled here as the CommonJS module it is.
 * - A schema or grammar the library cannot take ends in a C++ abort: the thrown error only says
 *   "Aborted()", while the cause goes to the module's stderr printer, which the module binds to
 *   `console.error` when it starts. The loader hands it a forwarding function instead, so that a
 *   failing compile can collect the cause for its error message. After an abort the instance is
 *   not trusted again: the next compile loads a fresh copy of the library.
 */
import fs from 'node:fs';
import { createRequire, Module } from 'node:module';

/** Bit i of word i >> 5: token i may come next. Length ceil(vocab / 32). */
export type TokenBitmask = Int32Array;

export interface XgrTokenizerInfo {
  dispose(): void;
}
export interface XgrCompiledGrammar {
  dispose(): void;
}
export interface XgrGrammarMatcher {
  acceptToken(token: number): boolean;
  getNextTokenBitmask(): Promise<TokenBitmask>;
  isTerminated(): boolean;
  rollBack(tokens: number): void;
  dispose(): void;
}
export interface XgrGrammarCompiler {
  compileJSONSchema(schema: string, anyWhitespace?: boolean, indent?: number, separators?: [string, string], strictMode?: boolean): Promise<XgrCompiledGrammar>;
  compileBuiltinJSONGrammar(): Promise<XgrCompiledGrammar>;
  compileGrammar(ebnf: string, rootRule?: string): Promise<XgrCompiledGrammar>;
  dispose(): void;
}

interface XgrLibrary {
  TokenizerInfo: {
    createTokenizerInfo(encodedVocab: string[], vocabType: string, prependSpace: boolean, vocabSize: number, stopTokenIds: number[]): Promise<XgrTokenizerInfo>;
  };
  GrammarCompiler: { createGrammarCompiler(info: XgrTokenizerInfo, cacheEnabled?: boolean): Promise<XgrGrammarCompiler> };
  GrammarMatcher: {
    createGrammarMatcher(compiled: XgrCompiledGrammar, overrideStopTokens?: number[], terminateWithoutStopToken?: boolean): Promise<XgrGrammarMatcher>;
  };
}

/** One loaded copy of the library, and the stderr lines it printed while `capture` ran. */
export class XgrammarInstance {
  private captured: string[] | null = null;
  /** Set once the instance aborted; its state is then not trusted for new grammars. */
  aborted = false;

  private constructor(readonly lib: XgrLibrary) {}

  static async load(): Promise<XgrammarInstance> {
    const require = createRequire(import.meta.url);
    const file = require.resolve('@mlc-ai/web-xgrammar');
    const mod = new Module(file) as Module & { _compile(code: string, filename: string): void; paths: string[] };
    mod.filename = file;
    mod.paths = (Module as unknown as { _nodeModulePaths(dir: string): string[] })._nodeModulePaths(file);
    mod._compile(fs.readFileSync(file, 'utf8'), file);
    const instance = new XgrammarInstance(mod.exports as XgrLibrary);
    // The library starts its WebAssembly module on first use and binds console.error then; start
    // it now with console.error pointing at the forwarder, which it keeps.
    const original = console.error;
    console.error = (...args: unknown[]) => {
      if (instance.captured) instance.captured.push(args.map(String).join(' '));
      else original(...args);
    };
    try {
      const info = await instance.lib.TokenizerInfo.createTokenizerInfo(['a'], 'raw', false, 1, [0]);
      info.dispose();
    } finally {
      console.error = original;
    }
    return instance;
  }

  /**
   * Runs a library call; an abort becomes an Error whose message is what the library printed
   * (its [FATAL] line, without the build path), and marks the instance aborted.
   */
  async capture<T>(call: () => Promise<T>): Promise<T> {
    this.captured = [];
    try {
      return await call();
    } catch (err) {
      const lines = this.captured.filter((l) => !/^Aborted\(/.test(l));
      if (String(err).includes('Aborted(')) this.aborted = true;
      const cause = lines.map((l) => l.replace(/^\[FATAL\]\s*\S+:\d+:\s*/, '')).join('; ') || String(err);
      throw new Error(cause, { cause: err });
    } finally {
      this.captured = null;
    }
  }
}
