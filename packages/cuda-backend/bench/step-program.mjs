// Prints the step program (src/step-program.ts) of a model or a synth preset, CPU only:
//   node packages/cuda-backend/bench/step-program.mjs MODEL_DIR|PRESET [BATCH] [--verify N] [--context N]
//     [--sms 132] [--dense bf16|fp8] [--experts mxfp4|bf16] [--device-bytes] [--explicit-norms] [--json FILE]
// Uses the built packages (pnpm -r build). Experts default to MXFP4 (float experts are quantized on
// load); dense weights to bf16 unless the checkpoint declares FP8.
import fs from 'node:fs';
import path from 'node:path';
import { loadModelSpec, parseModelConfig, PRESETS } from '@moeflash/core';
import { buildStepProgram, formatStepProgram } from '@moeflash/cuda-backend';

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(`--${name}`);
  if (i < 0) return def;
  const v = args[i + 1];
  args.splice(i, 2);
  return v;
};
const flag = (name) => {
  const i = args.indexOf(`--${name}`);
  if (i >= 0) args.splice(i, 1);
  return i >= 0;
};
const verify = opt('verify');
const context = opt('context');
const sms = Number(opt('sms', '132'));
const experts = opt('experts', 'mxfp4');
const denseOpt = opt('dense');
const json = opt('json');
const deviceBytes = flag('device-bytes');
const explicitNorms = flag('explicit-norms');
const [target, batch = '1'] = args;
if (!target) {
  console.error('usage: step-program.mjs MODEL_DIR|PRESET [BATCH] [--verify N] [--context N] [--sms N] [--dense bf16|fp8] [--experts mxfp4|bf16]');
  process.exit(2);
}
const spec = PRESETS[target] && !fs.existsSync(target) ? parseModelConfig(PRESETS[target].config, `preset ${target}`) : await loadModelSpec(path.resolve(target));
const q = spec.quantization;
const dense = denseOpt ?? (q?.method === 'fp8' || q?.dense ? 'fp8' : 'bf16');
const program = buildStepProgram(spec, {
  expertFormat: experts,
  denseFormat: dense,
  mode: verify ? 'verify' : 'decode',
  tokens: Number(verify ?? batch),
  smCount: sms,
  ...(context ? { context: Number(context) } : {}),
  accounting: deviceBytes ? 'device' : 'bandwidth-model',
  fuseNorms: !explicitNorms,
});
console.log(formatStepProgram(program, { perLayer: false }));
if (json) fs.writeFileSync(json, JSON.stringify(program));
