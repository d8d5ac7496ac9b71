/*
 * Matrix products on WebAssembly SIMD with exactly the arithmetic of `linear` (math/linear.ts).
 *
 * JavaScript computes a dot product as four float64 partial sums s0..s3 (element i goes to
 * s[i % 4]), combined as (s0 + s1) + (s2 + s3), plus the bias. Here two f64x2 accumulators hold
 * (s0, s1) and (s2, s3): lane for lane the same products of the same float32 values promoted to
 * float64, added in the same order (WebAssembly never fuses a multiply into an add), then the same
 * final combination and one rounding to float32. So results are bit-identical to the JavaScript
 * kernel, while each weight row is loaded once for two tokens and two lanes run at once. (Three
 * and four tokens a pass measured no faster: the accumulators no longer fit in registers.)
 *
 * The module is assembled here, byte by byte, from a generator parametrised by the number of
 * tokens K that share one pass over the weights.
 */

const MAX_K = 2;

// Opcodes (WebAssembly core and SIMD specifications).
const OP = {
  block: 0x02, loop: 0x03, br: 0x0c, brIf: 0x0d, end: 0x0b, if: 0x04, else: 0x05,
  localGet: 0x20, localSet: 0x21, localTee: 0x22,
  f32Load: 0x2a, f32Store: 0x38,
  i32Const: 0x41, f64Const: 0x44,
  i32Eqz: 0x45, i32GeU: 0x4f,
  i32Add: 0x6a, i32Mul: 0x6c,
  f64Add: 0xa0, f32DemoteF64: 0xb6, f64PromoteF32: 0xbb,
  simd: 0xfd,
} as const;
const SIMD = { load: 0x00, const: 0x0c, shuffle: 0x0d, f64x2ExtractLane: 0x21, f64x2PromoteLow: 0x5f, f64x2Add: 0xf0, f64x2Mul: 0xf2 } as const;
const T = { i32: 0x7f, f64: 0x7c, v128: 0x7b, void: 0x40, func: 0x60 } as const;

function uleb(n: number): number[] {
  const out: number[] = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n) b |= 0x80;
    out.push(b);
  } while (n);
  return out;
}

function sleb(n: number): number[] {
  const out: number[] = [];
  for (;;) {
    const b = n & 0x7f;
    n >>= 7;
    if ((n === 0 && !(b & 0x40)) || (n === -1 && b & 0x40)) {
      out.push(b);
      return out;
    }
    out.push(b | 0x80);
  }
}

const vec = (items: number[][]) => [...uleb(items.length), ...items.flat()];
const section = (id: number, body: number[]) => [id, ...uleb(body.length), ...body];
const str = (s: string) => [...uleb(s.length), ...Array.from(s, (c) => c.charCodeAt(0))];

/**
 * linK(x, w, rows, cols, bias, out): for r < rows, k < K:
 *   out_f32[k * rows + r] = fround(dot(w_f32[r * cols ..], x_f64[k * cols ..]) + (bias ? bias_f32[r] : 0))
 * x holds K rows of `cols` float64; all pointers are byte offsets; cols is a multiple of 4.
 */
function kernel(K: number): number[] {
  const [X, W, ROWS, COLS, BIAS, OUT] = [0, 1, 2, 3, 4, 5];
  const R = 6, WI = 7, WEND = 8, XO = 9, XB = 10; // XB .. XB + K - 1: token rows of x
  const ACC = XB + K; // v128: ACC + 2k (lanes s0, s1), ACC + 2k + 1 (lanes s2, s3)
  const WV = ACC + 2 * K, WLO = WV + 1, WHI = WV + 2;
  const BV = WHI + 1; // f64
  const c: number[] = [];
  const get = (l: number) => c.push(OP.localGet, ...uleb(l));
  const set = (l: number) => c.push(OP.localSet, ...uleb(l));
  const i32 = (n: number) => c.push(OP.i32Const, ...sleb(n));
  const simd = (op: number, ...imm: number[]) => c.push(OP.simd, ...uleb(op), ...imm);
  const memarg = [0, 0];

  // Token row pointers: XB + k = x + k * cols * 8.
  for (let k = 0; k < K; k++) {
    get(X);
    get(COLS);
    i32(8 * k);
    c.push(OP.i32Mul, OP.i32Add);
    set(XB + k);
  }
  i32(0);
  set(R);
  get(W);
  set(WI);
  c.push(OP.block, T.void, OP.loop, T.void);
  {
    get(R);
    get(ROWS);
    c.push(OP.i32GeU, OP.brIf, 1);
    for (let a = 0; a < 2 * K; a++) {
      simd(SIMD.const, ...new Array(16).fill(0));
      set(ACC + a);
    }
    // WEND = WI + cols * 4 (WI walks the weights row after row).
    get(WI);
    get(COLS);
    i32(4);
    c.push(OP.i32Mul, OP.i32Add);
    set(WEND);
    i32(0);
    set(XO);
    c.push(OP.block, T.void, OP.loop, T.void);
    {
      get(WI);
      get(WEND);
      c.push(OP.i32GeU, OP.brIf, 1);
      get(WI);
      simd(SIMD.load, ...memarg);
      c.push(OP.localTee, ...uleb(WV));
      simd(SIMD.f64x2PromoteLow);
      set(WLO);
      get(WV);
      get(WV);
      simd(SIMD.shuffle, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
      simd(SIMD.f64x2PromoteLow);
      set(WHI);
      for (let k = 0; k < K; k++) {
        for (let h = 0; h < 2; h++) {
          get(ACC + 2 * k + h);
          get(h ? WHI : WLO);
          get(XB + k);
          get(XO);
          c.push(OP.i32Add);
          simd(SIMD.load, 0, ...uleb(16 * h));
          simd(SIMD.f64x2Mul);
          simd(SIMD.f64x2Add);
          set(ACC + 2 * k + h);
        }
      }
      get(WI);
      i32(16);
      c.push(OP.i32Add);
      set(WI);
      get(XO);
      i32(32);
      c.push(OP.i32Add);
      set(XO);
      c.push(OP.br, 0);
    }
    c.push(OP.end, OP.end);
    // The bias of row r, or +0 (as `dot(...) + 0` in JavaScript).
    get(BIAS);
    c.push(OP.i32Eqz, OP.if, T.f64);
    c.push(OP.f64Const, 0, 0, 0, 0, 0, 0, 0, 0);
    c.push(OP.else);
    get(BIAS);
    get(R);
    i32(4);
    c.push(OP.i32Mul, OP.i32Add, OP.f32Load, 0, 0, OP.f64PromoteF32);
    c.push(OP.end);
    set(BV);
    for (let k = 0; k < K; k++) {
      // Address of out[k * rows + r].
      get(OUT);
      get(ROWS);
      i32(k);
      c.push(OP.i32Mul);
      get(R);
      c.push(OP.i32Add);
      i32(4);
      c.push(OP.i32Mul, OP.i32Add);
      // ((s0 + s1) + (s2 + s3)) + bias
      get(ACC + 2 * k);
      simd(SIMD.f64x2ExtractLane, 0);
      get(ACC + 2 * k);
      simd(SIMD.f64x2ExtractLane, 1);
      c.push(OP.f64Add);
      get(ACC + 2 * k + 1);
      simd(SIMD.f64x2ExtractLane, 0);
      get(ACC + 2 * k + 1);
      simd(SIMD.f64x2ExtractLane, 1);
      c.push(OP.f64Add, OP.f64Add);
      get(BV);
      c.push(OP.f64Add, OP.f32DemoteF64, OP.f32Store, 0, 0);
    }
    get(R);
    i32(1);
    c.push(OP.i32Add);
    set(R);
    c.push(OP.br, 0);
  }
  c.push(OP.end, OP.end, OP.end);
  const locals = [
    [...uleb(4 + K), T.i32],
    [...uleb(2 * K + 3), T.v128],
    [1, T.f64],
  ];
  const body = [...vec(locals), ...c];
  return [...uleb(body.length), ...body];
}

function moduleBytes(): Uint8Array {
  const ks = Array.from({ length: MAX_K }, (_, i) => i + 1);
  const bytes = [
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, vec([[T.func, ...vec(new Array(6).fill([T.i32])), 0]])),
    ...section(2, vec([[...str('env'), ...str('mem'), 0x02, 0x00, 0x00]])),
    ...section(3, vec(ks.map(() => [0]))),
    ...section(7, vec(ks.map((k) => [...str(`lin${k}`), 0x00, ...uleb(k - 1)]))),
    ...section(10, [...uleb(ks.length), ...ks.flatMap((k) => kernel(k))]),
  ];
  return new Uint8Array(bytes);
}

/** The part of the WebAssembly JavaScript API used here (the compiler's lib has no DOM types). */
interface WasmMemory {
  readonly buffer: ArrayBuffer;
}
interface WasmApi {
  validate(bytes: Uint8Array): boolean;
  Module: new (bytes: Uint8Array) => object;
  Instance: new (mod: object, imports: object) => { exports: Record<string, unknown> };
  Memory: new (d: { initial: number }) => WasmMemory;
}
const wasmApi = (globalThis as unknown as { WebAssembly?: WasmApi }).WebAssembly;

let compiled: object | null | undefined;
function wasmModule(): object | null {
  if (compiled === undefined) {
    try {
      const bytes = moduleBytes();
      compiled = wasmApi && wasmApi.validate(bytes) ? new wasmApi.Module(bytes) : null;
    } catch {
      compiled = null;
    }
  }
  return compiled ?? null;
}

type Kernel = (x: number, w: number, rows: number, cols: number, bias: number, out: number) => void;

/** Most bytes placed in one model's WebAssembly memory (the 32-bit address space, with room to spare). */
const MAX_BYTES = 3.5 * 2 ** 30;
const PAGE = 65536;

/**
 * A model's matrices (and biases) in one WebAssembly memory, and the kernels over them. Matrices
 * whose column count is not a multiple of 4, or that were not placed, go to the JavaScript kernel.
 */
export class WasmLinear {
  private readonly offsets = new Map<Float32Array, number>();
  private readonly views = new Map<Float32Array, Float32Array>();
  private readonly memory: WasmMemory;
  private readonly kernels: Kernel[];
  private readonly x: Float64Array;
  private readonly out: Float32Array;
  private readonly xPtr: number;
  private readonly outPtr: number;

  private constructor(mod: object, arrays: Float32Array[], maxRows: number, maxCols: number) {
    // Offset 0 stays unused: a bias pointer of 0 means "no bias".
    let at = 16;
    for (const a of arrays) {
      this.offsets.set(a, at);
      at += Math.ceil(a.byteLength / 16) * 16;
    }
    this.xPtr = at;
    at += MAX_K * maxCols * 8;
    this.outPtr = at;
    at += MAX_K * maxRows * 4;
    const memory = new wasmApi!.Memory({ initial: Math.ceil(at / PAGE) });
    this.memory = memory;
    const f32 = new Float32Array(memory.buffer);
    for (const [a, off] of this.offsets) f32.set(a, off / 4);
    this.x = new Float64Array(memory.buffer, this.xPtr, MAX_K * maxCols);
    this.out = new Float32Array(memory.buffer, this.outPtr, MAX_K * maxRows);
    const inst = new wasmApi!.Instance(mod, { env: { mem: memory } });
    this.kernels = Array.from({ length: MAX_K }, (_, k) => inst.exports[`lin${k + 1}`] as Kernel);
  }

  /** Places `arrays` (distinct by identity) in a new memory; null where WebAssembly SIMD is unavailable or they do not fit. */
  static create(arrays: Iterable<Float32Array>, maxRows: number, maxCols: number): WasmLinear | null {
    const mod = wasmModule();
    if (!mod) return null;
    const list = [...new Set(arrays)];
    const bytes = list.reduce((s, a) => s + a.byteLength + 16, 0) + MAX_K * (maxCols * 8 + maxRows * 4);
    if (bytes > MAX_BYTES) return null;
    try {
      return new WasmLinear(mod, list, maxRows, maxCols);
    } catch {
      return null;
    }
  }

  /** The copy of a placed array inside the WebAssembly memory (same values), else the array itself. */
  view(a: Float32Array): Float32Array {
    const off = this.offsets.get(a);
    if (off === undefined) return a;
    let v = this.views.get(a);
    if (!v) {
      v = new Float32Array(this.memory.buffer, off, a.length);
      this.views.set(a, v);
      this.offsets.set(v, off);
    }
    return v;
  }

  /** out[t * rows + r] = W[r] . x[t] + bias[r] for t < n, as `linear` does; false when W is not placed. */
  linear(x: Float32Array, n: number, w: Float32Array, rows: number, cols: number, bias: Float32Array | null, out: Float32Array): boolean {
    const wp = this.offsets.get(w);
    if (wp === undefined || cols % 4 !== 0 || rows * MAX_K > this.out.length || cols * MAX_K > this.x.length) return false;
    let bp = 0;
    if (bias) {
      const b = this.offsets.get(bias);
      if (b === undefined) return false;
      bp = b;
    }
    for (let t = 0; t < n; t += MAX_K) {
      const k = Math.min(MAX_K, n - t);
      this.x.set(x.subarray(t * cols, (t + k) * cols));
      this.kernels[k - 1](this.xPtr, wp, rows, cols, bp, this.outPtr);
      out.set(this.out.subarray(0, k * rows), t * rows);
    }
    return true;
  }
}
