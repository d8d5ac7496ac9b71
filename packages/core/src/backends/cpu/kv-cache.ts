import { MoeflashError } from '../../errors.js';
import type { KvPageStats } from '../backend.js';

/**
 * A full page registered for prefix reuse. The chain of parents is part of the identity: a
 * page's keys and values depend on every token before it, not only on its own.
 */
interface PrefixEntry {
  h1: number;
  h2: number;
  key: string;
  parent: PrefixEntry | null;
  tokens: Int32Array;
  page: number;
  /** Entries whose parent this is; only leaves may be evicted, so a chain never loses its head. */
  children: number;
}

/** One sequence's cache: the pages of its positions, in order, and the token at each position. */
export class PagedSequence {
  pages: number[] = [];
  length = 0;
  /** Token id at each cached position: the key of its pages in the prefix index. */
  tokens: number[] = [];
  /** Index entries of the leading full pages, chain[i].page === pages[i]. */
  chain: PrefixEntry[] = [];
}

export interface KvPoolShape {
  numLayers: number;
  /** Floats in one position's key row of one layer (numKvHeads * headDim). */
  rowSize: number;
  /**
   * Floats in one position's value row (default `rowSize`). 0 for latent attention, whose one
   * cached row per position serves as both keys and values.
   */
  valueRowSize?: number;
  pageSize: number;
  pages: number;
  prefixCaching: boolean;
}

const EMPTY_HASH = [0x811c9dc5, 0x01000193] as const;

/**
 * A fixed number of KV pages of `pageSize` positions each, shared by every sequence.
 *
 * The count is fixed at load; the memory of a page is allocated the first time it is handed out
 * and then kept, so a generous pool costs only what a workload actually touches.
 *
 * Page layout: for each layer, keys then values, each `pageSize` rows of `rowSize` (values:
 * `valueRowSize`) floats, so
 * copying a page's rows of one layer into a contiguous run is one `set` per page.
 *
 * Pages carry reference counts. Full pages that a sequence has committed (everything before its
 * current length) are entered in a prefix index keyed by a hash of the token ids of the whole
 * chain; a later sequence whose prompt starts with the same full pages takes references to them
 * instead of recomputing. A page with more than one holder is copied before anyone writes to it.
 * Pages held only by the index are the cache: evicted least recently released first, leaves
 * before their parents, when the free list runs dry.
 */
export class KvPagePool {
  readonly pageSize: number;
  readonly total: number;
  readonly pageFloats: number;
  /** Floats from a layer's keys to its values inside a page, and from one layer to the next. */
  readonly valueOffset: number;
  readonly layerStride: number;
  private readonly data: Array<Float32Array | null>;
  private readonly refs: Int32Array;
  private readonly free: number[] = [];
  private readonly buckets = new Map<string, PrefixEntry[]>();
  private readonly byPage = new Map<number, PrefixEntry>();
  /** Evictable entries (held only by the index, no children), oldest first. */
  private readonly lru = new Map<PrefixEntry, true>();
  /** Index entries whose page only the index holds: reclaimable on demand. */
  private cachedCount = 0;
  private allocated = 0;

  constructor(private readonly shape: KvPoolShape) {
    if (!Number.isInteger(shape.pageSize) || shape.pageSize < 1) {
      throw new MoeflashError('INVALID_ARGUMENT', `kvCache.pageSize must be a positive integer, got ${shape.pageSize}`);
    }
    if (!Number.isInteger(shape.pages) || shape.pages < 1) {
      throw new MoeflashError('INVALID_ARGUMENT', `kvCache.pages must be a positive integer, got ${shape.pages}`);
    }
    this.pageSize = shape.pageSize;
    this.total = shape.pages;
    this.valueOffset = shape.pageSize * shape.rowSize;
    this.layerStride = this.valueOffset + shape.pageSize * (shape.valueRowSize ?? shape.rowSize);
    this.pageFloats = shape.numLayers * this.layerStride;
    this.data = new Array(shape.pages).fill(null);
    this.refs = new Int32Array(shape.pages);
    // Hand out low page ids first (a stack popped from the end).
    for (let p = shape.pages - 1; p >= 0; p--) this.free.push(p);
  }

  stats(): KvPageStats {
    const free = this.free.length;
    return { pageSize: this.pageSize, total: this.total, free, cached: this.cachedCount, used: this.total - free - this.cachedCount };
  }

  /** Bytes of page memory allocated so far. */
  bytes(): number {
    return this.allocated * this.pageFloats * 4;
  }

  /** Pages an allocation can get now: free ones and cached ones it may evict. */
  available(): number {
    return this.free.length + this.cachedCount;
  }

  page(p: number): Float32Array {
    return this.data[p]!;
  }

  /**
   * Make `seq` able to hold `length` positions: pages for the growth, and a private copy of the
   * page the next write lands in when that page is shared. All or nothing: false, with nothing
   * allocated, when the pool cannot supply them.
   */
  ensure(seq: PagedSequence, length: number): boolean {
    this.commit(seq);
    if (length <= seq.length) return true;
    const P = this.pageSize;
    const grow = Math.max(0, Math.ceil(length / P) - seq.pages.length);
    const writeIdx = seq.length % P === 0 ? -1 : Math.floor(seq.length / P);
    const cow = writeIdx >= 0 && this.refs[seq.pages[writeIdx]] > 1;
    if (this.available() < grow + (cow ? 1 : 0)) return false;
    if (cow) {
      const old = seq.pages[writeIdx];
      const fresh = this.alloc();
      this.data[fresh]!.set(this.data[old]!);
      this.release(old);
      seq.pages[writeIdx] = fresh;
    }
    for (let i = 0; i < grow; i++) seq.pages.push(this.alloc());
    return true;
  }

  /** Drop positions >= length; pages past the new end go back to the pool. */
  truncate(seq: PagedSequence, length: number): void {
    seq.length = length;
    seq.tokens.length = length;
    const keep = Math.ceil(length / this.pageSize);
    while (seq.pages.length > keep) this.release(seq.pages.pop()!);
    if (seq.chain.length > Math.floor(length / this.pageSize)) seq.chain.length = Math.floor(length / this.pageSize);
  }

  /** Give back every page of a sequence (its committed full pages stay cached for reuse). */
  releaseSequence(seq: PagedSequence): void {
    this.commit(seq);
    for (const p of seq.pages) this.release(p);
    seq.pages = [];
    seq.chain = [];
    seq.tokens = [];
    seq.length = 0;
  }

  /**
   * Attach the cached pages of the longest run of full pages that starts `tokens` to an empty
   * sequence. At least one token is left to run, so the caller still gets logits for the last.
   * Returns the positions now cached.
   */
  reusePrefix(seq: PagedSequence, tokens: readonly number[]): number {
    if (seq.length !== 0 || seq.pages.length !== 0) {
      throw new MoeflashError('INVALID_ARGUMENT', 'reusePrefix needs an empty sequence; release it first');
    }
    if (!this.shape.prefixCaching) return 0;
    const P = this.pageSize;
    const max = Math.floor((tokens.length - 1) / P);
    let parent: PrefixEntry | null = null;
    for (let i = 0; i < max; i++) {
      const e = this.lookup(parent, tokens, i * P);
      if (!e) break;
      this.retain(e.page);
      seq.pages.push(e.page);
      seq.chain.push(e);
      parent = e;
    }
    seq.length = seq.pages.length * P;
    seq.tokens = tokens.slice(0, seq.length) as number[];
    return seq.length;
  }

  /** Enter the sequence's full committed pages in the prefix index. */
  private commit(seq: PagedSequence): void {
    if (!this.shape.prefixCaching) return;
    const P = this.pageSize;
    const full = Math.floor(seq.length / P);
    for (let i = seq.chain.length; i < full; i++) {
      const parent = i === 0 ? null : seq.chain[i - 1];
      const found = this.lookup(parent, seq.tokens, i * P);
      if (found) {
        // Same tokens behind it, so the same keys and values bit for bit: share the indexed page.
        if (found.page !== seq.pages[i]) {
          this.retain(found.page);
          this.release(seq.pages[i]);
          seq.pages[i] = found.page;
        }
        seq.chain.push(found);
        continue;
      }
      const page = seq.pages[i];
      if (this.byPage.has(page)) {
        // Already indexed under another chain (cannot happen with exact keys); leave it unshared.
        break;
      }
      const [h1, h2] = this.hash(parent, seq.tokens, i * P);
      const key = `${h1}:${h2}`;
      const e: PrefixEntry = { h1, h2, key, parent, tokens: Int32Array.from(seq.tokens.slice(i * P, (i + 1) * P)), page, children: 0 };
      const bucket = this.buckets.get(key);
      if (bucket) bucket.push(e);
      else this.buckets.set(key, [e]);
      this.byPage.set(page, e);
      if (parent) parent.children++;
      this.refs[page]++;
      seq.chain.push(e);
    }
  }

  private hash(parent: PrefixEntry | null, tokens: readonly number[], from: number): [number, number] {
    let h1 = parent ? parent.h1 : EMPTY_HASH[0];
    let h2 = parent ? parent.h2 : EMPTY_HASH[1];
    for (let i = from; i < from + this.pageSize; i++) {
      const t = tokens[i] | 0;
      h1 = Math.imul(h1 ^ t, 0x01000193) >>> 0;
      h2 = Math.imul((h2 ^ t) + 0x9e3779b9, 0x85ebca6b) >>> 0;
      h2 ^= h2 >>> 13;
    }
    return [h1, h2];
  }

  private lookup(parent: PrefixEntry | null, tokens: readonly number[], from: number): PrefixEntry | null {
    const [h1, h2] = this.hash(parent, tokens, from);
    const bucket = this.buckets.get(`${h1}:${h2}`);
    if (!bucket) return null;
    outer: for (const e of bucket) {
      if (e.parent !== parent) continue;
      for (let i = 0; i < this.pageSize; i++) if (e.tokens[i] !== tokens[from + i]) continue outer;
      return e;
    }
    return null;
  }

  private alloc(): number {
    let p = this.free.pop();
    if (p === undefined) p = this.evictOne();
    if (!this.data[p]) {
      this.data[p] = new Float32Array(this.pageFloats);
      this.allocated++;
    }
    this.refs[p] = 1;
    return p;
  }

  private evictOne(): number {
    const first = this.lru.keys().next();
    if (first.done) throw new MoeflashError('OUT_OF_MEMORY', 'KV page pool exhausted');
    const e = first.value;
    this.lru.delete(e);
    const bucket = this.buckets.get(e.key)!;
    bucket.splice(bucket.indexOf(e), 1);
    if (!bucket.length) this.buckets.delete(e.key);
    this.byPage.delete(e.page);
    this.cachedCount--;
    this.refs[e.page] = 0;
    const parent = e.parent;
    if (parent && --parent.children === 0 && this.refs[parent.page] === 1) this.lru.set(parent, true);
    return e.page;
  }

  private retain(p: number): void {
    if (++this.refs[p] === 2) {
      const e = this.byPage.get(p);
      if (e) {
        this.cachedCount--;
        this.lru.delete(e);
      }
    }
  }

  private release(p: number): void {
    const r = --this.refs[p];
    if (r === 0) this.free.push(p);
    else if (r === 1) {
      const e = this.byPage.get(p);
      if (e) {
        this.cachedCount++;
        if (e.children === 0) this.lru.set(e, true);
      }
    }
  }
}
