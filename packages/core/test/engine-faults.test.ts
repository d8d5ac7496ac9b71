/**
 * Faults at the backend boundary: the real CPU model behind a LoadedModel wrapper that throws
 * chosen errors at chosen calls (a step that runs out of memory, a device fault that the backend
 * marks fatal, a bad argument, a backend call outside step() that throws, a backend that holds
 * fewer positions a sequence than the pool). The engine and its scheduler are what is tested:
 * which requests fail and with what, whether the others go on, that every KV page comes back,
 * that new requests are refused after a fatal fault and that close() returns.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CpuBackend,
  createEngine,
  isFatalBackendError,
  MoeflashError,
  type Backend,
  type Engine,
  type EngineOptions,
  type GenerateOptions,
  type LoadedModel,
  type StepPlan,
} from '@moeflash/core';
import { tinyModel } from './helpers.js';

const greedy: GenerateOptions = { temperature: 0, ignoreEos: true };
const prompt = (seed: number, len: number) => Array.from({ length: len }, (_, i) => (seed * 31 + i * 7) % 500);

interface Faults {
  /** Called before each step with its 1-based number; throw to fail the step. */
  step?: (n: number, plan: StepPlan) => void;
  /** Called before each reserve(); throw to fail it. */
  reserve?: (seq: number, length: number) => void;
  /** Positions a sequence may hold on this "device" (reserve() refuses more), as CUDA's maxSeqLen. */
  maxSequence?: number;
}

/** The CPU backend, its models wrapped so that `faults` can make their calls throw. */
function faultyBackend(faults: Faults): Backend & { steps: () => number } {
  const cpu = new CpuBackend();
  let steps = 0;
  return {
    name: 'cpu',
    steps: () => steps,
    devices: () => cpu.devices(),
    async load(spec, weights, opts) {
      const model = await cpu.load(spec, weights, opts);
      return new Proxy(model, {
        get(target, key, receiver) {
          if (key === 'step') {
            return async (plan: StepPlan) => {
              steps++;
              faults.step?.(steps, plan);
              return target.step(plan);
            };
          }
          if (key === 'reserve') {
            return (seq: number, length: number) => {
              faults.reserve?.(seq, length);
              if (faults.maxSequence !== undefined && length > faults.maxSequence) return false;
              return target.reserve!(seq, length);
            };
          }
          const v = Reflect.get(target, key, receiver);
          return typeof v === 'function' ? v.bind(target) : v;
        },
      }) as LoadedModel;
    },
  };
}

/** What a sticky CUDA error looks like once the CUDA backend has translated it. */
const deviceFault = () =>
  new MoeflashError('DEVICE_ERROR', 'CUDA error in step (cudaStreamSynchronize): an illegal memory access was encountered (cudaErrorIllegalAddress)', {
    fatal: true,
  });

/** Settles a request: its tokens, or the error its result and its stream both ended with. */
async function settle(s: ReturnType<Engine['generate']>): Promise<{ tokens?: number[]; error?: unknown; streamError?: unknown }> {
  let streamError: unknown;
  const consumed = (async () => {
    try {
      for await (const _ of s) void _;
    } catch (e) {
      streamError = e;
    }
  })();
  try {
    const r = await s.result;
    await consumed;
    return { tokens: r.tokens };
  } catch (error) {
    await consumed;
    return { error, streamError };
  }
}

describe('engine faults at the backend boundary (CPU, tiny qwen3_moe)', () => {
  let dir: string;
  let plain: Engine;
  const engines: Engine[] = [];
  const make = async (backend: Backend, opts: Partial<EngineOptions> = {}) => {
    const e = await createEngine({ model: dir, backend, log: () => {}, ...opts });
    engines.push(e);
    return e;
  };
  const reference = async (p: number[], maxTokens: number) => (await plain.generate(p, { ...greedy, maxTokens }).result).tokens;

  beforeAll(async () => {
    dir = await tinyModel('qwen3_moe');
    plain = await createEngine({ model: dir, backend: 'cpu', log: () => {} });
    engines.push(plain);
  });
  afterAll(async () => {
    for (const e of engines) await e.close();
  });

  it('a request that can never fit is refused at once, naming the sizes and the fix; the running ones go on', async () => {
    const e = await make(faultyBackend({}), { kvCache: { pageSize: 4, pages: 12 } });
    const a = e.generate(prompt(1, 9), { ...greedy, maxTokens: 12 });
    const b = e.generate(prompt(2, 7), { ...greedy, maxTokens: 12 });
    let err: unknown;
    try {
      e.generate(prompt(3, 10), { ...greedy, maxTokens: 60 });
    } catch (x) {
      err = x;
    }
    expect(err).toBeInstanceOf(MoeflashError);
    expect((err as MoeflashError).code).toBe('OUT_OF_MEMORY');
    expect((err as Error).message).toMatch(/can never fit.*70 positions.*12 pages.*lower maxTokens.*larger kvCache/);
    const [ra, rb] = await Promise.all([settle(a), settle(b)]);
    expect(ra.tokens).toEqual(await reference(prompt(1, 9), 12));
    expect(rb.tokens).toEqual(await reference(prompt(2, 7), 12));
    expect(e.stats().kvPages!.used).toBe(0);
    expect(e.fault).toBeNull();
  });

  it('a request the backend cannot hold (fewer positions a sequence than the pool) fails once alone instead of waiting forever', async () => {
    // The pool fits 40 positions, the "device" 24 a sequence (as the CUDA backend's maxSeqLen).
    const e = await make(faultyBackend({ maxSequence: 24 }), { kvCache: { pageSize: 4, pages: 40 } });
    const long = e.generate(prompt(4, 10), { ...greedy, maxTokens: 30 });
    const short = e.generate(prompt(5, 8), { ...greedy, maxTokens: 10 });
    const [rl, rs] = await Promise.all([settle(long), settle(short)]);
    expect((rl.error as MoeflashError).code).toBe('OUT_OF_MEMORY');
    expect((rl.error as Error).message).toMatch(/cannot hold 25 positions of this request even with every other request preempted.*lower maxTokens/);
    expect(rl.streamError).toBe(rl.error);
    expect(rs.tokens).toEqual(await reference(prompt(5, 8), 10));
    // Admitted alone, a prompt longer than the backend's limit fails too (it used to block the queue).
    const tooLong = await settle(e.generate(prompt(6, 30), { ...greedy, maxTokens: 2 }));
    expect((tooLong.error as Error).message).toMatch(/cannot hold 30 positions/);
    expect((await settle(e.generate(prompt(5, 8), { ...greedy, maxTokens: 10 }))).tokens).toEqual(await reference(prompt(5, 8), 10));
    expect(e.stats().kvPages!.used).toBe(0);
  });

  it('a step that runs out of memory fails its request with the cause and the fix; the queued one goes on', async () => {
    const backend = faultyBackend({
      step: (n) => {
        if (n === 3) throw new MoeflashError('OUT_OF_MEMORY', 'CUDA out of memory: the step\'s activations asked for 96.0 MiB on device 0, which has 12.0 MiB free of 80.00 GiB');
      },
    });
    const e = await make(backend, { maxBatch: 1, kvCache: { pageSize: 4, pages: 32 } });
    const first = e.generate(prompt(7, 6), { ...greedy, maxTokens: 8 });
    const second = e.generate(prompt(8, 6), { ...greedy, maxTokens: 8 });
    const [r1, r2] = await Promise.all([settle(first), settle(second)]);
    const err = r1.error as MoeflashError;
    expect(err).toBeInstanceOf(MoeflashError);
    expect(err.code).toBe('OUT_OF_MEMORY');
    expect(err.fatal).toBe(false);
    expect(err.message).toMatch(/a step of 1 sequence \(1 tokens\) ran out of memory.*goes on with the others.*96\.0 MiB.*smaller maxBatch or maxStepTokens/);
    expect((err.cause as Error).message).toMatch(/^CUDA out of memory/);
    expect(r2.tokens).toEqual(await reference(prompt(8, 6), 8));
    expect(e.stats().kvPages!.used).toBe(0);
    expect(e.stats().requests).toMatchObject({ failed: 1, completed: 1 });
    expect(e.fault).toBeNull();
  });

  it('a non-fatal device error (a bad argument) fails only that step\'s requests; the engine goes on', async () => {
    const backend = faultyBackend({
      step: (n) => {
        if (n === 2) throw new MoeflashError('INVALID_ARGUMENT', 'Model.step: a KV slot is outside the cache');
      },
    });
    const e = await make(backend, { maxBatch: 1 });
    const first = e.generate(prompt(9, 5), { ...greedy, maxTokens: 6 });
    const second = e.generate(prompt(10, 5), { ...greedy, maxTokens: 6 });
    const [r1, r2] = await Promise.all([settle(first), settle(second)]);
    expect((r1.error as MoeflashError).code).toBe('INVALID_ARGUMENT');
    expect(r2.tokens).toEqual(await reference(prompt(10, 5), 6));
    expect(e.fault).toBeNull();
    expect((await settle(e.generate(prompt(9, 5), { ...greedy, maxTokens: 6 }))).tokens).toEqual(await reference(prompt(9, 5), 6));
    expect(e.stats().kvPages!.used).toBe(0);
  });

  it('a fatal device fault ends every pending request with it, refuses new ones, and close() returns at once', async () => {
    const fault = deviceFault();
    expect(isFatalBackendError(fault)).toBe(true);
    const backend = faultyBackend({
      step: (n) => {
        if (n === 4) throw fault;
      },
    });
    const e = await make(backend, { maxBatch: 2, kvCache: { pageSize: 4, pages: 32 } });
    const reqs = [1, 2, 3, 4].map((i) => e.generate(prompt(20 + i, 6), { ...greedy, maxTokens: 20 }));
    const results = await Promise.all(reqs.map(settle));
    // The two in the step get the fault itself; the two queued an error that names it.
    expect(results[0].error).toBe(fault);
    expect(results[1].error).toBe(fault);
    for (const r of results.slice(2)) {
      const err = r.error as MoeflashError;
      expect(err.code).toBe('DEVICE_ERROR');
      expect(err.fatal).toBe(true);
      expect(err.cause).toBe(fault);
      expect(err.message).toMatch(/the engine failed before this request could finish: .*cudaErrorIllegalAddress.*create a new one/);
    }
    for (const r of results) expect(r.streamError).toBe(r.error);
    expect(backend.steps()).toBe(4);
    expect(e.fault).toBe(fault);
    expect(e.stats().requests).toMatchObject({ failed: 4, queued: 0, running: 0 });
    expect(e.stats().kvPages!.used).toBe(0);

    let refused: unknown;
    try {
      e.generate(prompt(1, 4), greedy);
    } catch (x) {
      refused = x;
    }
    expect((refused as MoeflashError).code).toBe('DEVICE_ERROR');
    expect((refused as MoeflashError).fatal).toBe(true);
    expect((refused as Error).message).toMatch(/the engine failed and takes no new requests: .*cudaErrorIllegalAddress.*close it and create a new one/);
    expect(() => e.chat([{ role: 'user', content: 'hi' }])).toThrow(/the engine failed and takes no new requests/);
    expect(backend.steps()).toBe(4);

    const t0 = performance.now();
    await e.close();
    expect(performance.now() - t0).toBeLessThan(1000);
    expect(() => e.generate(prompt(1, 4), greedy)).toThrow(/the engine is closed/);
  });

  it('a fatal fault while a consumer is behind on its stream ends that request too (paused requests are pending)', async () => {
    const backend = faultyBackend({
      step: (n) => {
        if (n === 6) throw deviceFault();
      },
    });
    const e = await make(backend, { maxBatch: 2, streamBuffer: 1 });
    const slow = e.generate(prompt(30, 5), { ...greedy, maxTokens: 50 }); // never read: pauses
    slow.result.catch(() => {});
    const busy = e.generate(prompt(31, 5), { ...greedy, maxTokens: 50 });
    const rb = await settle(busy);
    expect((rb.error as Error).message).toMatch(/cudaErrorIllegalAddress/);
    await expect(slow.result).rejects.toMatchObject({ code: 'DEVICE_ERROR', fatal: true });
    expect(e.stats().kvPages!.used).toBe(0);
    await e.close();
  });

  it('an error thrown by a backend call outside step() fails every request instead of escaping the loop', async () => {
    let calls = 0;
    const backend = faultyBackend({
      reserve: () => {
        if (++calls === 5) throw new Error('the backend\'s page table is corrupt');
      },
    });
    const e = await make(backend, { maxBatch: 2 });
    const results = await Promise.all([1, 2, 3].map((i) => settle(e.generate(prompt(40 + i, 5), { ...greedy, maxTokens: 10 }))));
    for (const r of results) expect((r.error as Error).message).toMatch(/page table is corrupt/);
    expect(e.fault).toBeInstanceOf(Error);
    expect(() => e.generate(prompt(1, 4), greedy)).toThrow(/the engine failed and takes no new requests: the backend's page table is corrupt/);
    expect(e.stats().kvPages!.used).toBe(0);
    await e.close();
  });
});
