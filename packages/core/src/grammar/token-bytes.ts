/**
 * The bytes each token id stands for, read from the vocabulary strings the way the tokenizer's
 * decoder reads them. Grammar masks work on these bytes: a token is allowed when its bytes keep the
 * output a valid prefix, whatever text the decoder would show for it alone.
 */
import type { TextTokenizer } from '../tokenizer/tokenizer.js';

/** GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for U+0100 and up. */
function byteLevelDecoder(): Map<string, number> {
  const bytes: number[] = [];
  for (let b = 33; b <= 126; b++) bytes.push(b);
  for (let b = 161; b <= 172; b++) bytes.push(b);
  for (let b = 174; b <= 255; b++) bytes.push(b);
  const chars = bytes.slice();
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    if (!bytes.includes(b)) {
      bytes.push(b);
      chars.push(256 + extra++);
    }
  }
  return new Map(bytes.map((b, i) => [String.fromCodePoint(chars[i]!), b]));
}

const utf8 = new TextEncoder();

export interface TokenTable {
  /** Logits width: ids 0 .. vocabSize - 1 (the model's, which may exceed the tokenizer's). */
  vocabSize: number;
  /** bytes[id]: what the token adds to the output; empty for special tokens and ids without a token. */
  bytes: Uint8Array[];
  /** Special tokens (and ids without a token): never text, so a grammar never allows them as text. */
  special: Uint8Array;
  /** The vocabulary strings as the tokenizer stores them (xgrammar decodes them itself). */
  encoded: string[];
}

/** Every token's bytes, for a model whose logits have `vocabSize` entries. */
export function tokenTable(tokenizer: TextTokenizer, vocabSize: number): TokenTable {
  const byteLevel = tokenizer.byteEncoding === 'byte_level' ? byteLevelDecoder() : null;
  const bytes: Uint8Array[] = [];
  const encoded: string[] = [];
  const special = new Uint8Array(vocabSize);
  for (let id = 0; id < vocabSize; id++) {
    const piece = tokenizer.idToToken(id);
    if (piece === undefined || tokenizer.isSpecial(id)) {
      special[id] = 1;
      bytes.push(new Uint8Array(0));
      encoded.push('');
      continue;
    }
    encoded.push(piece);
    bytes.push(pieceBytes(piece, tokenizer.byteEncoding, byteLevel));
  }
  return { vocabSize, bytes, special, encoded };
}

function pieceBytes(piece: string, encoding: TextTokenizer['byteEncoding'], byteLevel: Map<string, number> | null): Uint8Array {
  if (byteLevel) {
    const out: number[] = [];
    for (const ch of piece) {
      const b = byteLevel.get(ch);
      // An added (non-special) token is stored as its text, not in the byte alphabet.
      if (b === undefined) return utf8.encode(piece);
      out.push(b);
    }
    return Uint8Array.from(out);
  }
  if (encoding === 'byte_fallback') {
    const hex = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
    if (hex) return Uint8Array.of(parseInt(hex[1]!, 16));
    return utf8.encode(piece.replace(/\u2581/g, ' '));
  }
  return utf8.encode(piece);
}
