/**
 * How the addon's errors reach the engine (no GPU needed): translateNativeError on errors shaped
 * as native/cuda_errors.cc throws them, and the engine's reaction to a translated sticky error at
 * the backend boundary (the CPU model behind a wrapper whose chosen step throws it).
 */
import { describe, expect, it } from 'vitest';
import { CpuBackend, createEngine, MoeflashError, type Backend, type LoadedModel, type StepPlan } from '@moeflash/core';
import { STICKY_CUDA_ERRORS, translateNativeError } from '@moeflash/cuda-backend';
import { tinyModel } from '../../core/test/helpers.js';

/** An error as check_cuda throws it. */
function nativeCudaError(name: string, call = 'step (cudaStreamSynchronize)', text = 'a CUDA failure'): Error {
  return Object.assign(new Error(`CUDA error in ${call}: ${text} (${name})`), { code: 'CUDA_ERROR', cudaError: name, cudaCall: call });
}

describe('translateNativeError', () => {
  it('a sticky CUDA error is a fatal DEVICE_ERROR that says the context is gone', () => {
    for (const name of ['cudaErrorIllegalAddress', 'cudaErrorLaunchFailure', 'cudaErrorIllegalInstruction', 'cudaErrorAssert']) {
      expect(STICKY_CUDA_ERRORS.has(name)).toBe(true);
      const e = translateNativeError(nativeCudaError(name)) as MoeflashError & { cudaError: string; cudaCall: string };
      expect(e).toBeInstanceOf(MoeflashError);
      expect(e.code).toBe('DEVICE_ERROR');
      expect(e.fatal).toBe(true);
      expect(e.cudaError).toBe(name);
      expect(e.cudaCall).toBe('step (cudaStreamSynchronize)');
      expect(e.message).toMatch(new RegExp(`\\(${name}\\)\\. This CUDA error is sticky: .*start a new process`));
    }
  });

  it('other CUDA errors are DEVICE_ERRORs that are not fatal; OUT_OF_MEMORY and INVALID_ARGUMENT keep their codes', () => {
    const e = translateNativeError(nativeCudaError('cudaErrorLaunchOutOfResources')) as MoeflashError;
    expect(e.code).toBe('DEVICE_ERROR');
    expect(e.fatal).toBe(false);
    expect(e.message).not.toMatch(/sticky/);
    const oom = translateNativeError(Object.assign(new Error('CUDA out of memory: cudaMalloc asked for 1.0 GiB'), { code: 'OUT_OF_MEMORY', requestedBytes: 2 ** 30 }));
    expect(oom).toMatchObject({ code: 'OUT_OF_MEMORY', fatal: false, requestedBytes: 2 ** 30 });
    expect(translateNativeError(Object.assign(new RangeError('Model.step: bad tokens'), { code: 'INVALID_ARGUMENT' }))).toMatchObject({ code: 'INVALID_ARGUMENT', fatal: false });
    const plain = new Error('not from the addon');
    expect(translateNativeError(plain)).toBe(plain);
  });

  it('the engine fails every request on a translated sticky error and refuses new ones', async () => {
    const cpu = new CpuBackend();
    let steps = 0;
    const backend: Backend = {
      name: 'cpu',
      devices: () => cpu.devices(),
      async load(spec, weights, opts) {
        const model = await cpu.load(spec, weights, opts);
        return new Proxy(model, {
          get(target, key, receiver) {
            if (key === 'step')
              return async (plan: StepPlan) => {
                if (++steps === 3) throw translateNativeError(nativeCudaError('cudaErrorLaunchFailure', 'step (cudaStreamSynchronize)', 'unspecified launch failure'));
                return target.step(plan);
              };
            const v = Reflect.get(target, key, receiver);
            return typeof v === 'function' ? v.bind(target) : v;
          },
        }) as LoadedModel;
      },
    };
    const e = await createEngine({ model: await tinyModel('qwen3_moe'), backend, log: () => {}, maxBatch: 1 });
    const reqs = [1, 2].map((i) => e.generate([i, 2, 3, 4], { temperature: 0, ignoreEos: true, maxTokens: 10 }));
    const errors = await Promise.all(reqs.map((r) => r.result.then(() => null, (x: unknown) => x)));
    expect(errors[0]).toMatchObject({ code: 'DEVICE_ERROR', fatal: true, cudaError: 'cudaErrorLaunchFailure' });
    expect(errors[1]).toMatchObject({ code: 'DEVICE_ERROR', fatal: true });
    expect((errors[1] as Error).message).toMatch(/engine failed before this request could finish: .*cudaErrorLaunchFailure/);
    expect(() => e.generate([1, 2], { maxTokens: 2 })).toThrow(/the engine failed and takes no new requests: .*unspecified launch failure/);
    expect(e.stats().kvPages!.used).toBe(0);
    await e.close();
  });
});
