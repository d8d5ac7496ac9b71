import { loadModelWeights } from '../../weights/layouts.js';
import type { ModelSpec } from '../../model/spec.js';
import type { WeightSource } from '../../weights/tensor.js';
import type { Backend, DeviceInfo, LoadedModel, LoadOptions } from '../backend.js';
import { CpuModel } from './cpu-model.js';
import os from 'node:os';

/** The float32 reference backend: the oracle for every other backend. */
export class CpuBackend implements Backend {
  readonly name = 'cpu';

  devices(): DeviceInfo[] {
    return [{ index: 0, name: `CPU (${os.cpus()[0]?.model ?? 'unknown'})`, totalMemory: os.totalmem(), freeMemory: os.freemem() }];
  }

  async load(spec: ModelSpec, weights: WeightSource, opts: LoadOptions = {}): Promise<LoadedModel> {
    const w = await loadModelWeights(spec, weights, opts.onProgress);
    return new CpuModel(spec, w);
  }
}
