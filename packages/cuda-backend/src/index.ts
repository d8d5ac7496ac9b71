/**
 * @moeflash/cuda-backend: moeflash on NVIDIA GPUs through a native addon (node-addon-api + nvcc).
 *
 * ```
 *  src/native.ts ──> moeflash_cuda.node ──> native/*.cc ──> kernels/*.cu
 *   (typed boundary)   (prebuilt in @moeflash/cuda-backend-linux-x64, or node-gyp into build/Release/;
 *                       cudart_static)      (glue, errors)   (one file a kernel family)
 *  src/ops.ts: test-only kernel calls, compared with @moeflash/core's math/ and sampling/
 * ```
 * @packageDocumentation
 */
export {
  isCudaAvailable,
  loadAddon,
  tryLoadAddon,
  translateNativeError,
  STICKY_CUDA_ERRORS,
  addonCandidates,
  ADDON_PATH,
  BUILD_COMMAND,
  LOCAL_ADDON_PATH,
  PREBUILT_PACKAGE,
  type AddonCandidate,
  type CudaAvailability,
  type CudaDeviceInfo,
  type CudaErrorFields,
  type NativeAddon,
  type NativeBench,
  type NativeModel,
  type NativeModelConfig,
  type NativeOps,
  type NativeProbe,
} from './native.js';
export { cudaOps, type CudaOps, type MoeShape, type MoeWeights } from './ops.js';
export {
  CudaBackend,
  CudaModel,
  createCudaBackend,
  planExpertLoad,
  resolvePrecision,
  F32_PRECISION_BELOW_PARAMS,
  type CudaPrecisionOption,
  type CudaExpertLoad,
  type CudaExpertsOption,
  type CudaLoadOptions,
  type CudaSequenceOutput,
  type CudaStepPlan,
} from './model.js';
export { measureCopyBandwidth, deviceMemory } from './bench.js';
export {
  buildStepProgram,
  exportStepProgram,
  formatStepProgram,
  simulate as simulateStepProgram,
  TASK_KINDS,
  TASK_ARG_NAMES,
  TASK_ARGS,
  type CounterWait,
  type StepCounter,
  type StepProgram,
  type StepProgramArrays,
  type StepProgramOptions,
  type StepProgramSummary,
  type StepTask,
  type TaskKind,
} from './step-program.js';
