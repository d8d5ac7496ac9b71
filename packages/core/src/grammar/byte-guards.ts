/**
 * Byte-level checks laid over xgrammar's masks. Measured on the bundled model's vocabulary,
 * @mlc-ai/web-xgrammar 0.1.27 lets through, inside JSON strings, (1) raw control bytes such as
 * 0x15 or 0x1e, which JSON does not allow unescaped (JSON.parse rejects them), and (2) bytes that
 * are not UTF-8: overlong forms (C0 85, E0 81 BB) and code points past U+10FFFF (F4 B5 ..). Both
 * are checked here, exactly, on the token bytes:
 *
 * - Utf8Guard follows the UTF-8 decoder's state across tokens (the RFC 3629 table: which byte
 *   ranges may follow which lead byte) and allows a token only when all its bytes are legal from
 *   the current state. A special token (no bytes) may come only between characters.
 * - jsonTextMask drops every token holding a control byte other than '\n': JSON text needs none
 *   (strings escape them; whitespace here is ' ' and '\n', the grammar's formatting).
 */
import { maskSet, tokenMask, type TokenMask } from '../sampling/token-mask.js';
import type { TokenTable } from './token-bytes.js';

/** Decoder states: between characters, or how many continuation bytes are due and their range. */
const enum U {
  Start = 0,
  Cont1, // one 80-BF due
  Cont2, // two 80-BF due
  Cont3, // three 80-BF due
  E0, // A0-BF, then one
  ED, // 80-9F (no surrogates), then one
  F0, // 90-BF, then two
  F4, // 80-8F (up to U+10FFFF), then two
  Reject,
}
const STATES = 8;

function step(state: number, b: number): number {
  switch (state) {
    case U.Start:
      if (b < 0x80) return U.Start;
      if (b >= 0xc2 && b <= 0xdf) return U.Cont1;
      if (b === 0xe0) return U.E0;
      if (b === 0xed) return U.ED;
      if (b >= 0xe1 && b <= 0xef) return U.Cont2;
      if (b === 0xf0) return U.F0;
      if (b >= 0xf1 && b <= 0xf3) return U.Cont3;
      if (b === 0xf4) return U.F4;
      return U.Reject;
    case U.Cont1:
      return b >= 0x80 && b <= 0xbf ? U.Start : U.Reject;
    case U.Cont2:
      return b >= 0x80 && b <= 0xbf ? U.Cont1 : U.Reject;
    case U.Cont3:
      return b >= 0x80 && b <= 0xbf ? U.Cont2 : U.Reject;
    case U.E0:
      return b >= 0xa0 && b <= 0xbf ? U.Cont1 : U.Reject;
    case U.ED:
      return b >= 0x80 && b <= 0x9f ? U.Cont1 : U.Reject;
    case U.F0:
      return b >= 0x90 && b <= 0xbf ? U.Cont2 : U.Reject;
    case U.F4:
      return b >= 0x80 && b <= 0x8f ? U.Cont2 : U.Reject;
    default:
      return U.Reject;
  }
}

/** Per decoder state: the tokens allowed from it, and the state each of them leads to. */
export class Utf8Table {
  readonly allowed: TokenMask[] = [];
  readonly next: Uint8Array[] = [];

  constructor(table: TokenTable) {
    const V = table.vocabSize;
    for (let s = 0; s < STATES; s++) {
      const mask = tokenMask(V, false);
      const next = new Uint8Array(V);
      for (let t = 0; t < V; t++) {
        const bytes = table.bytes[t]!;
        if (bytes.length === 0) {
          if (s === U.Start) maskSet(mask, t, true);
          continue;
        }
        let state = s;
        for (let i = 0; i < bytes.length && state !== U.Reject; i++) state = step(state, bytes[i]!);
        if (state !== U.Reject) {
          maskSet(mask, t, true);
          next[t] = state;
        }
      }
      this.allowed.push(mask);
      this.next.push(next);
    }
  }
}

/** The UTF-8 decoder's state over one request's output. */
export class Utf8Guard {
  state: number = U.Start;
  constructor(private readonly table: Utf8Table) {}
  mask(): TokenMask {
    return this.table.allowed[this.state]!;
  }
  accept(token: number): void {
    this.state = this.table.next[this.state]![token]!;
  }
}

/** Tokens without control bytes other than '\n' (special tokens included: the grammar rules those). */
export function jsonTextMask(table: TokenTable): TokenMask {
  const mask = tokenMask(table.vocabSize, true);
  for (let t = 0; t < table.vocabSize; t++) {
    for (const b of table.bytes[t]!) {
      if (b < 0x20 && b !== 0x0a) {
        maskSet(mask, t, false);
        break;
      }
    }
  }
  return mask;
}
