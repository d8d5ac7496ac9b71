/**
 * One request's grammar state: which tokens may come next, given what it emitted so far.
 *
 *   prepare()  -> compile (first time) or compute the next mask; awaited before the step is planned
 *   mask()     -> the allowed tokens of the next position (xgrammar's mask AND the byte guards)
 *   accept(t)  -> the request emitted t
 *   draftMasks -> for speculation: the drafts that stay inside the grammar, and the mask of every
 *                 verify row, the matcher rolled back afterwards
 */
import { MoeflashError } from '../errors.js';
import { maskAllows, maskAnd, type TokenMask } from '../sampling/token-mask.js';
import { Utf8Guard } from './byte-guards.js';
import type { CompiledOutputGrammar, GrammarCompiler } from './grammar-compiler.js';
import type { OutputGrammar } from './response-format.js';
import type { XgrGrammarMatcher } from './xgrammar-binding.js';

export class TokenConstraint {
  private matcher: XgrGrammarMatcher | null = null;
  private grammar: CompiledOutputGrammar | null = null;
  private readonly utf8: Utf8Guard;
  private current: TokenMask | null = null;
  private pending: Promise<void> | null;
  private disposed = false;

  constructor(
    private readonly compiler: GrammarCompiler,
    spec: OutputGrammar,
    /** Tokens that end the request: allowed once the grammar is complete, and only then. */
    private readonly stopTokens: ReadonlySet<number>,
  ) {
    this.utf8 = new Utf8Guard(compiler.utf8);
    this.pending = this.start(spec);
    // Awaited through prepare(); this keeps a failure before then from being an unhandled rejection.
    this.pending.catch(() => {});
  }

  private async start(spec: OutputGrammar): Promise<void> {
    this.grammar = await this.compiler.compile(spec);
    const matcher = await this.grammar.instance.lib.GrammarMatcher.createGrammarMatcher(this.grammar.compiled, [...this.stopTokens], false);
    if (this.disposed) return matcher.dispose();
    this.matcher = matcher;
    this.current = await this.maskNow();
    this.pending = null;
  }

  /** Host work the next step waits for, or undefined when the mask is current. */
  prepare(): Promise<void> | undefined {
    return this.pending ?? undefined;
  }

  /** The tokens allowed at the next position (after prepare() settled). */
  mask(): TokenMask {
    if (!this.current) throw new Error('TokenConstraint.mask() before prepare() settled');
    return this.current;
  }

  /** The request emitted `token`; the next mask is computed in the background (see prepare()). */
  accept(token: number): void {
    const matcher = this.matcher!;
    if (!matcher.acceptToken(token)) {
      throw new MoeflashError('INVALID_ARGUMENT', `token ${token} does not continue the output under its grammar; it was outside the mask`);
    }
    this.utf8.accept(token);
    this.current = null;
    if (this.stopTokens.has(token) || matcher.isTerminated()) return;
    this.pending = this.maskNow().then((m) => {
      this.current = m;
      this.pending = null;
    });
    this.pending.catch(() => {});
  }

  /**
   * The longest run of `drafts` that the grammar allows (a draft outside the mask is rejected
   * there, with everything after it), and one mask a verify row: masks[i] for the row that
   * follows drafts[0 .. i-1]. A stop token ends the run: the bonus row can still choose it.
   */
  async draftMasks(drafts: readonly number[]): Promise<{ kept: number; masks: TokenMask[] }> {
    const matcher = this.matcher!;
    const masks = [this.mask()];
    const utf8Before = this.utf8.state;
    let kept = 0;
    for (const d of drafts) {
      if (this.stopTokens.has(d) || !maskAllows(masks[kept]!, d) || !matcher.acceptToken(d)) break;
      this.utf8.accept(d);
      kept++;
      masks.push(await this.maskNow());
    }
    if (kept) matcher.rollBack(kept);
    this.utf8.state = utf8Before;
    return { kept, masks };
  }

  dispose(): void {
    this.disposed = true;
    this.matcher?.dispose();
    this.matcher = null;
  }

  private async maskNow(): Promise<TokenMask> {
    const words = await this.matcher!.getNextTokenBitmask();
    const mask = maskAnd(words, this.utf8.mask());
    return this.grammar!.json ? maskAnd(mask, this.compiler.jsonText, mask) : mask;
  }
}
