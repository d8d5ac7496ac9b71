/**
 * A real device fault inside a step, on the GPU: MOEFLASH_FAULT_AFTER_STEPS makes the model's Nth
 * step launch a kernel that traps (kernels/fault.cu), a sticky CUDA error after which the CUDA
 * context of this process is unusable. The engine must end every pending request (running and
 * queued) with an error naming the fault, refuse new requests at once, give every KV page back,
 * close promptly, and the process must not crash. The same behaviour is checked without a GPU in
 * core/test/engine-faults.test.ts and test/native-errors.test.ts.
 *
 * The fault poisons the whole process's CUDA context, so this file must run in a process of its
 * own (vitest's forks pool gives each file one) and nothing else on the device may follow it here.
 */
import { describe, expect, it } from 'vitest';
import { createEngine, MoeflashError } from '@moeflash/core';
import { createCudaBackend, isCudaAvailable, STICKY_CUDA_ERRORS } from '../src/index.js';
import { tinyModel } from '../../core/test/helpers.js';

// Read by the addon once, at the first step of the process: set before anything steps.
const FAULT_STEP = 4;
process.env.MOEFLASH_FAULT_AFTER_STEPS = String(FAULT_STEP);

const avail = isCudaAvailable();

describe.skipIf(!avail.ok)('a sticky CUDA error inside a step (fault injection)', () => {
  it('fails every pending request with it, refuses new ones, frees every page, and close() returns', async () => {
    const dir = await tinyModel('gpt_oss');
    const e = await createEngine({ model: dir, backend: createCudaBackend(), log: () => {}, maxBatch: 2 });
    const greedy = { temperature: 0, ignoreEos: true, maxTokens: 32 };
    const reqs = [1, 2, 3, 4].map((i) => e.generate([i, 11, 12, 13, 14], greedy));
    const streamErrors = reqs.map(async (r) => {
      try {
        for await (const _ of r) void _;
        return null;
      } catch (x) {
        return x;
      }
    });
    const errors = await Promise.all(reqs.map((r) => r.result.then(() => null, (x: unknown) => x)));

    // The two in the faulting step get the translated CUDA error itself.
    for (const err of errors.slice(0, 2)) {
      expect(err).toBeInstanceOf(MoeflashError);
      const m = err as MoeflashError & { cudaError?: string; cudaCall?: string };
      expect(m.code).toBe('DEVICE_ERROR');
      expect(m.fatal).toBe(true);
      expect(STICKY_CUDA_ERRORS.has(m.cudaError!)).toBe(true);
      expect(m.message).toMatch(/CUDA error in .*This CUDA error is sticky/);
      console.log(`fault: ${m.cudaError} in ${m.cudaCall}`);
    }
    // The queued ones an error that names it.
    for (const err of errors.slice(2)) {
      expect(err).toMatchObject({ code: 'DEVICE_ERROR', fatal: true });
      expect((err as Error).message).toMatch(/the engine failed before this request could finish: CUDA error in .*cudaError/);
    }
    expect(await Promise.all(streamErrors)).toEqual(errors);
    expect(e.stats().steps).toBe(FAULT_STEP - 1);
    expect(e.stats().kvPages!.used).toBe(0);
    expect(e.fault).toBe(errors[0]);

    expect(() => e.generate([1, 2, 3], greedy)).toThrow(/the engine failed and takes no new requests: CUDA error in .*sticky/);

    const t0 = performance.now();
    await e.close();
    const closeMs = performance.now() - t0;
    expect(closeMs).toBeLessThan(5000);
    console.log(`close() after the fault: ${closeMs.toFixed(1)} ms`);
  });
});
