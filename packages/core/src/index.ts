/**
 * @moeflash/core: run Mixture-of-Experts language models in a Node.js process.
 *
 * ```
 *  config.json ──> ModelSpec ─┐
 *  *.safetensors ─> WeightSource ─> Backend.load ─> LoadedModel.step(plan) ─> logits
 *  tokenizer.json ─> TextTokenizer ─┐                      ▲
 *  Engine.generate / chat ──> Scheduler (batches steps) ───┘ ──> sampling ──> streamed chunks
 * ```
 * @packageDocumentation
 */
export * from './errors.js';
export * from './model/spec.js';
export { parseModelConfig, loadModelSpec } from './model/config.js';
export * from './model/footprint.js';
export * from './weights/tensor.js';
export * from './weights/safetensors.js';
export * from './weights/safetensors-writer.js';
export * from './weights/dtypes.js';
export * from './weights/mxfp4.js';
export * from './weights/layouts.js';
export * from './weights/byte-source.js';
export * from './weights/expected-tensors.js';
export * from './weights/finite.js';
export * from './weights/validate-checkpoint.js';
export * from './backends/backend.js';
export * from './backends/registry.js';
export { CpuBackend } from './backends/cpu/cpu-backend.js';
export { CpuModel } from './backends/cpu/cpu-model.js';
export * from './math/linear.js';
export * from './math/norm.js';
export * from './math/rope.js';
export * from './math/router.js';
export * from './math/experts.js';
export * from './math/attention.js';
export * from './math/activations.js';
export * from './sampling/rng.js';
export * from './sampling/sample.js';
export * from './sampling/token-mask.js';
export * from './sampling/logprobs.js';
export * from './grammar/response-format.js';
export { GrammarCompiler, type CompiledOutputGrammar } from './grammar/grammar-compiler.js';
export { TokenConstraint } from './grammar/token-constraint.js';
export { tokenTable, type TokenTable } from './grammar/token-bytes.js';
export { Utf8Table, Utf8Guard, jsonTextMask } from './grammar/byte-guards.js';
export * from './tokenizer/tokenizer.js';
export * from './tokenizer/chat.js';
export * from './tokenizer/generation-config.js';
export * from './engine/engine.js';
export * from './tools/tool-calls.js';
export { forcedCall, validateTools, type ToolDefinition, type ToolChoice, type ChatReply, type ForcedCall } from './tools/chat-tools.js';
export * from './tools/chat-stream.js';
export * from './engine/load.js';
export { Scheduler, type ScheduledRequest, type SchedulerOptions, type SchedulerStats, type StepInfo, type StepWork, type SequenceControl } from './engine/scheduler.js';
export { StopStringFilter } from './engine/stop-strings.js';
export * from './synth/synth.js';
export * from './synth/presets.js';
export * from './engine/speculation.js';
export * from './debug/route-diff.js';
export { linearBatch, mlpBatch, MlpBatchScratch } from './backends/cpu/batched.js';
export { WasmLinear } from './backends/cpu/wasm-linear.js';
