/**
 * attention_prefill (tiled, causal, many query rows per sequence) against core's attendOne, row
 * by row, and against attention_decode run with one row a sequence (how a prefill was computed
 * before). Batches mix sequences with cached history and a chunk of new rows, in a paged cache
 * whose pages are shuffled; positions that no sequence wrote hold NaN, so reading one shows.
 * Needs an NVIDIA GPU and the built addon; where either is missing the suite is skipped and the
 * reason printed.
 *
 * Limit: ||out - ref|| / ||ref|| <= 1e-3 (the kernel feeds Q and P to the tensor cores as bf16
 * hi + lo pairs, so it lands near 1e-6).
 */
import { describe, expect, it } from 'vitest';

import { attendOne } from '@moeflash/core';

import { cudaOps, isCudaAvailable } from '../src/index.js';
import { logCheck, randomBf16, randomNormal, relError, rng } from './helpers.js';

const cuda = isCudaAvailable();
const skip = !cuda.ok;
if (!cuda.ok) console.log(`[cuda] attention prefill tests skipped: ${cuda.reason}`);

const LIMIT = 1e-3;
const NAN_BF16 = 0x7fc0;
const ops = () => cudaOps();

function expectClose(name: string, out: ArrayLike<number>, ref: ArrayLike<number>): void {
  const err = relError(out, ref);
  logCheck(name, err, LIMIT);
  expect(err, name).toBeLessThanOrEqual(LIMIT);
}

/** [cached history, new rows] of one sequence. */
type Seq = readonly [number, number];

function batch(seqs: readonly Seq[], numHeads: number, numKvHeads: number, headDim: number, pageSize: number, seed: number) {
  const r = rng(seed);
  const row = numKvHeads * headDim;
  const lens = seqs.map(([h, n]) => h + n);
  const maxPages = Math.ceil(Math.max(...lens) / pageSize);
  // A shared pool with spare pages, handed out in shuffled order: tables must be followed.
  const pages = seqs.reduce((n, _, s) => n + Math.ceil(lens[s] / pageSize), 0) + 5;
  const order = Array.from({ length: pages }, (_, i) => i);
  for (let i = pages - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  const kc = randomBf16(pages * pageSize * row, r);
  const vc = randomBf16(pages * pageSize * row, r);
  kc.bits.fill(NAN_BF16);
  vc.bits.fill(NAN_BF16);
  let next = 0;
  const seqPages = lens.map((len) => order.slice(next, (next += Math.ceil(len / pageSize))));
  // Gathered keys / values of each sequence, positions 0..len-1, for the reference.
  const keys = lens.map((len) => new Float32Array(len * row));
  const values = lens.map((len) => new Float32Array(len * row));
  lens.forEach((len, s) => {
    const k = randomBf16(len * row, r);
    const v = randomBf16(len * row, r);
    for (let p = 0; p < len; p++) {
      const dst = (seqPages[s][Math.floor(p / pageSize)] * pageSize + (p % pageSize)) * row;
      kc.bits.set(k.bits.subarray(p * row, (p + 1) * row), dst);
      vc.bits.set(v.bits.subarray(p * row, (p + 1) * row), dst);
    }
    keys[s].set(k.values);
    values[s].set(v.values);
  });
  // Rows: each sequence's new positions in order. A row's table maps the pages it uses; the
  // rest holds stale page ids, as the engine's reused input buffer does.
  const rows = seqs.reduce((n, [, c]) => n + c, 0);
  const seqLens = new Int32Array(rows);
  const rowSeq = new Int32Array(rows);
  const seqStarts = new Int32Array(seqs.length + 1);
  const blockTable = new Int32Array(rows * maxPages);
  let t = 0;
  seqs.forEach(([hist, n], s) => {
    seqStarts[s] = t;
    for (let i = 0; i < n; i++, t++) {
      seqLens[t] = hist + i + 1;
      rowSeq[t] = s;
      const used = Math.ceil(seqLens[t] / pageSize);
      for (let p = 0; p < maxPages; p++) blockTable[t * maxPages + p] = p < used ? seqPages[s][p] : Math.floor(r() * pages);
    }
  });
  seqStarts[seqs.length] = rows;
  const q = randomNormal(rows * numHeads * headDim, r);
  return { kc, vc, keys, values, rows, seqLens, rowSeq, seqStarts, blockTable, q, r };
}

describe.skipIf(skip)('attention_prefill', () => {
  it.each([
    // name, heads, kv heads, head dim, window, sinks, [history, new rows] per sequence, page size
    ['gpt-oss sliding + sinks', 64, 8, 64, 128, true, [[0, 150], [300, 37], [5, 1], [700, 64]], 16],
    ['gpt-oss full + sinks', 64, 8, 64, 0, true, [[0, 97], [513, 20]], 32],
    ['qwen3 chunked prefill', 32, 4, 128, 0, false, [[0, 130], [255, 33], [1, 1]], 16],
    ['group of 1', 8, 8, 128, 0, false, [[40, 100], [0, 65]], 16],
    ['group of 4 + window', 32, 8, 128, 100, false, [[99, 50], [0, 120], [450, 8]], 16],
    ['group of 16 + sinks', 16, 1, 64, 0, true, [[600, 20], [3, 9]], 64],
    ['group of 3, dim 96, pages of 5', 12, 4, 96, 33, true, [[40, 45], [7, 3]], 5],
  ] as const)('%s heads=%i kv=%i dim=%i window=%i', (name, numHeads, numKvHeads, headDim, window, withSinks, seqs, pageSize) => {
    const b = batch(seqs, numHeads, numKvHeads, headDim, pageSize, numHeads * headDim + seqs.length + window);
    const sinks = withSinks ? randomNormal(numHeads, b.r, 2) : null;
    const scale = 1 / Math.sqrt(headDim);
    const common = { q: b.q, kCache: b.kc.bits, vCache: b.vc.bits, blockTable: b.blockTable, seqLens: b.seqLens, sinks, numHeads, numKvHeads, headDim, pageSize, window, scale };
    const got = ops().attentionPrefill({ ...common, seqStarts: b.seqStarts });

    const width = numHeads * headDim;
    const ref = new Float32Array(b.rows * width);
    const scores = new Float64Array(Math.max(...b.seqLens));
    for (let t = 0; t < b.rows; t++) {
      const s = b.rowSeq[t];
      const len = b.seqLens[t];
      const from = window > 0 ? Math.max(0, len - window) : 0;
      attendOne(b.q, t * width, b.keys[s], b.values[s], from, len - 1, { numHeads, numKvHeads, headDim, scale }, sinks, ref, t * width, scores);
    }
    expectClose(`attention prefill ${name} vs attendOne`, got, ref);

    // The decode kernel with each row as its own sequence: what the engine ran before.
    const perRow = ops().attentionDecode(common);
    expectClose(`attention prefill ${name} vs attention_decode per row`, got, perRow);
  });

  it('gives a row the same result whatever else is in the batch and however it is tiled', () => {
    const [numHeads, numKvHeads, headDim, pageSize, window] = [32, 4, 128, 16, 50];
    const b = batch([[20, 70], [100, 5]], numHeads, numKvHeads, headDim, pageSize, 7);
    const scale = 1 / Math.sqrt(headDim);
    const args = { kCache: b.kc.bits, vCache: b.vc.bits, numHeads, numKvHeads, headDim, pageSize, window, scale };
    const all = ops().attentionPrefill({ ...args, q: b.q, blockTable: b.blockTable, seqLens: b.seqLens, seqStarts: b.seqStarts });
    const same = (name: string, x: Float32Array, y: Float32Array) => {
      const i = x.findIndex((v, k) => !Object.is(v, y[k]));
      logCheck(`attention prefill ${name}`, i < 0 ? 'identical' : `first difference at ${i}: ${x[i]} vs ${y[i]}`);
      expect(i, name).toBe(-1);
    };
    // Sequence 0's rows cut at row 13 instead of in tiles of 8: other tile boundaries.
    same('tiling invariance', ops().attentionPrefill({ ...args, q: b.q, blockTable: b.blockTable, seqLens: b.seqLens, seqStarts: Int32Array.of(0, 13, 70, 75) }), all);
    // Sequence 1 alone, its rows at the start of the batch instead of after 70 others.
    const width = numHeads * headDim;
    const maxPages = b.blockTable.length / b.rows;
    const alone = ops().attentionPrefill({
      ...args,
      q: b.q.slice(70 * width),
      blockTable: b.blockTable.slice(70 * maxPages),
      seqLens: b.seqLens.slice(70),
      seqStarts: Int32Array.of(0, 5),
    });
    same('batch invariance', alone, all.slice(70 * width));
  });

  it('rejects rows of one sequence that disagree on their pages', () => {
    const b = batch([[10, 4]], 8, 2, 64, 4, 3);
    const maxPages = b.blockTable.length / b.rows;
    const table = b.blockTable.slice();
    table[1 * maxPages] = (table[0] + 1) % (b.kc.bits.length / (4 * 2 * 64));
    expect(() =>
      ops().attentionPrefill({
        q: b.q, kCache: b.kc.bits, vCache: b.vc.bits, blockTable: table, seqLens: b.seqLens, seqStarts: b.seqStarts,
        numHeads: 8, numKvHeads: 2, headDim: 64, pageSize: 4, scale: 0.125,
      }),
    ).toThrow(/must share their block-table pages/);
  });
});
