/**
 * Holds an opened checkpoint against the model spec before a backend loads it: every tensor the
 * config implies is present, with a shape config.json allows and a dtype that can hold it; no
 * decoder layer carries tensors the config does not describe (an attention bias where
 * `attention_bias` is false would otherwise be loaded and used); optionally, no weight is NaN or
 * infinite. The safetensors reader has already checked each file against the format.
 */
import { MoeflashError, type ErrorCode } from '../errors.js';
import type { ModelSpec } from '../model/spec.js';
import { similarNames } from './safetensors.js';
import { expectedTensors, type ExpectedTensor } from './expected-tensors.js';
import { countNonFinite } from './finite.js';
import { mtpTensorNames } from './mtp.js';
import type { DType, TensorInfo, WeightSource } from './tensor.js';

/** Dtypes a weight can be stored in (decoded exactly to float32 by every backend). */
export const FLOAT_WEIGHT_DTYPES: readonly DType[] = ['BF16', 'F16', 'F32', 'F64', 'F8_E4M3', 'F8_E5M2'];

export interface ValidateCheckpointOptions {
  /**
   * Read every weight and refuse NaN or infinite values (off by default: it reads the whole
   * checkpoint once more; the `moeflash` CLI turns it on).
   */
  checkFinite?: boolean;
}

interface Problem {
  code: ErrorCode;
  message: string;
}

const mismatch = 'the checkpoint and config.json do not belong together: re-download the model, or fix config.json';

function shapeText(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** The FP8 scale block of the spec (config.json's `weight_block_size`; HF's default otherwise). */
function fp8Block(spec: ModelSpec): [number, number] {
  const q = spec.quantization;
  return (q?.method === 'fp8' ? q.weightBlockSize : q?.dense?.weightBlockSize) ?? [128, 128];
}

function checkTensor(spec: ModelSpec, src: WeightSource, want: ExpectedTensor, problems: Problem[]): void {
  if (!src.has(want.name)) {
    const near = similarNames(want.name, src.names());
    const hint = near.length > 0 ? `; similar names in the checkpoint: ${near.map((n) => `'${n}'`).join(', ')}` : '';
    problems.push({
      code: 'WEIGHTS_MISSING',
      message: `tensor '${want.name}' is missing from ${src.origin}, but config.json (${spec.source}) implies it (${want.why})${hint}; the checkpoint is incomplete or ${mismatch}`,
    });
    return;
  }
  const info = src.info(want.name);
  if (!want.shapes.some((s) => sameShape(s, info.shape))) {
    const allowed = want.shapes.map(shapeText).join(' or ');
    problems.push({
      code: 'WEIGHTS_INVALID',
      message: `tensor '${want.name}' in ${info.file} has shape ${shapeText(info.shape)}, but config.json (${spec.source}) implies ${allowed} (${want.why}); ${mismatch}`,
    });
    return;
  }
  if (want.kind !== 'float') {
    if (info.dtype !== 'U8') {
      problems.push({
        code: 'WEIGHTS_INVALID',
        message: `tensor '${want.name}' in ${info.file} has dtype ${info.dtype}; MXFP4 blocks and scales are stored as U8 (gpt-oss's layout): re-export the checkpoint`,
      });
    }
    return;
  }
  if (!FLOAT_WEIGHT_DTYPES.includes(info.dtype)) {
    problems.push({
      code: 'WEIGHTS_INVALID',
      message: `tensor '${want.name}' in ${info.file} has dtype ${info.dtype}, which holds no weights; a weight is stored as one of ${FLOAT_WEIGHT_DTYPES.join(', ')}: re-export the checkpoint`,
    });
    return;
  }
  checkScale(spec, src, info, problems);
}

/** Whether config.json declares block-scaled FP8 weights (`quant_method: fp8`, or nested in an mxfp4 config). */
function declaresBlockFp8(spec: ModelSpec): boolean {
  const q = spec.quantization;
  return q?.method === 'fp8' || q?.dense?.method === 'fp8';
}

/**
 * A block-scale companion (`W_scale_inv`) must match its weight: 2-D, one scale a block. Where
 * config.json declares block-scaled FP8, an FP8 weight without its scales would be read unscaled.
 */
function checkScale(spec: ModelSpec, src: WeightSource, info: TensorInfo, problems: Problem[]): void {
  const scaleName = `${info.name}_scale_inv`;
  if (!src.has(scaleName)) {
    if (declaresBlockFp8(spec) && (info.dtype === 'F8_E4M3' || info.dtype === 'F8_E5M2')) {
      problems.push({
        code: 'WEIGHTS_MISSING',
        message: `tensor '${scaleName}' is missing from ${src.origin}: '${info.name}' in ${info.file} is ${info.dtype} and config.json (${spec.source}) declares block-scaled FP8, so its values need their block scales; the checkpoint is incomplete or ${mismatch}`,
      });
    }
    return;
  }
  const scale = src.info(scaleName);
  if (info.shape.length !== 2) {
    problems.push({
      code: 'WEIGHTS_INVALID',
      message: `tensor '${scaleName}' in ${scale.file} scales the ${info.shape.length}-D tensor '${info.name}'; moeflash applies FP8 block scales to 2-D weights only: dequantize that tensor, or store it per expert`,
    });
    return;
  }
  const [br, bc] = fp8Block(spec);
  const want = [Math.ceil(info.shape[0] / br), Math.ceil(info.shape[1] / bc)];
  if (!sameShape(scale.shape, want)) {
    problems.push({
      code: 'WEIGHTS_INVALID',
      message: `tensor '${scaleName}' in ${scale.file} has shape ${shapeText(scale.shape)}, but a ${shapeText(info.shape)} weight in ${br}x${bc} blocks needs ${shapeText(want)}; check weight_block_size in config.json (${spec.source})`,
    });
  } else if (!FLOAT_WEIGHT_DTYPES.includes(scale.dtype)) {
    problems.push({
      code: 'WEIGHTS_INVALID',
      message: `tensor '${scaleName}' in ${scale.file} has dtype ${scale.dtype}; block scales are floats (F32 as HF writes them): re-export the checkpoint`,
    });
  }
}

/**
 * A tensor inside a decoder layer that the spec does not list would be ignored (a layer past
 * num_hidden_layers, an expert past num_experts) or, for an attention bias the config turns off,
 * silently used by a loader that reads what is there: either way config.json and the weights
 * disagree.
 */
function checkLayerExtras(spec: ModelSpec, src: WeightSource, listed: ReadonlySet<string>, problems: Problem[]): void {
  const mtp = new Set(mtpTensorNames(spec, src));
  for (const name of src.names()) {
    const m = /^model\.layers\.(\d+)\./.exec(name);
    if (m === null || listed.has(name) || name.includes('rotary_emb') || mtp.has(name)) continue;
    if (name.endsWith('_scale_inv') && listed.has(name.slice(0, -'_scale_inv'.length))) continue;
    const layer = Number(m[1]);
    const file = src.info(name).file;
    let why: string;
    if (layer >= spec.numLayers) {
      why = `config.json (${spec.source}) has num_hidden_layers ${spec.numLayers}` +
        (spec.mtpLayers ? ` and num_nextn_predict_layers ${spec.mtpLayers} (multi-token-prediction layers ${spec.numLayers}..${spec.numLayers + spec.mtpLayers - 1})` : '');
    }
    else if (/\.self_attn\.[qkvo]_proj\.bias$/.test(name)) why = `config.json (${spec.source}) sets no attention_bias, so the model has no attention biases`;
    else if (/\.experts\.\d+\./.test(name)) why = `config.json (${spec.source}) has ${spec.moe.numExperts} experts a layer (numbered from 0)`;
    else why = `config.json (${spec.source}) describes no such tensor in a ${spec.family} layer`;
    problems.push({ code: 'WEIGHTS_INVALID', message: `tensor '${name}' in ${file} is not part of the model: ${why}; ${mismatch}` });
  }
}

async function checkFinite(src: WeightSource, want: ExpectedTensor[], problems: Problem[]): Promise<void> {
  const bad: string[] = [];
  let total = 0;
  for (const t of want) {
    const names = src.has(`${t.name}_scale_inv`) ? [t.name, `${t.name}_scale_inv`] : [t.name];
    for (const name of names) {
      const info = src.info(name);
      const { count, first } = countNonFinite(await src.read(name), info.dtype, t.kind === 'mxfp4-scales');
      if (count === 0) continue;
      total++;
      const values = info.shape.reduce((a, b) => a * b, 1);
      if (bad.length < 5) bad.push(`'${name}' in ${info.file} (${count} of ${values} values, the first at element ${first})`);
    }
  }
  if (total > 0) {
    const more = total > bad.length ? ` and ${total - bad.length} more` : '';
    problems.push({
      code: 'WEIGHTS_INVALID',
      message: `${total} tensor${total === 1 ? '' : 's'} of ${src.origin} hold NaN or infinite weights: ${bad.join(', ')}${more}; the checkpoint is corrupt (re-download it) or was saved from a diverged run`,
    });
  }
}

/**
 * Checks `src` against `spec` (see the file comment); throws the first problem found, its message
 * counting the others.
 *
 * @throws MoeflashError `WEIGHTS_MISSING` for a tensor the config implies that is not there;
 *   `WEIGHTS_INVALID` for a wrong shape or dtype, a tensor the config does not describe, or
 *   (with `checkFinite`) NaN or infinite weights
 */
export async function validateCheckpoint(spec: ModelSpec, src: WeightSource, opts: ValidateCheckpointOptions = {}): Promise<void> {
  const expected = expectedTensors(spec, src);
  const all = [...expected.top, ...expected.layers.flatMap((l) => l.tensors)];
  const problems: Problem[] = [];
  for (const t of all) checkTensor(spec, src, t, problems);
  checkLayerExtras(spec, src, new Set(all.map((t) => t.name)), problems);
  if (problems.length === 0 && opts.checkFinite) await checkFinite(src, all, problems);
  if (problems.length === 0) return;
  const [first] = problems;
  const others = problems.length > 1 ? ` (${problems.length - 1} more problem${problems.length === 2 ? '' : 's'} in this checkpoint)` : '';
  throw new MoeflashError(first.code, `${first.message}${others}`);
}
