/**
 * Hugging Face `config.json` -> {@link ModelSpec}. The one place that reads `config.json`; the rest
 * of moeflash works from the spec.
 */
import { readFile, stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { MoeflashError } from '../errors.js';
import type { ModelFamily, ModelSpec } from './spec.js';
import { ConfigFields, describeValue, invalidConfig, isPlainObject, unsupportedConfig } from './fields.js';
import { parseDeepseekV3 } from './families/deepseek-v3.js';
import { parseGptOss } from './families/gpt-oss.js';
import { parseMixtral } from './families/mixtral.js';
import { parseQwen3Moe } from './families/qwen3-moe.js';

const PARSERS: ReadonlyMap<string, (f: ConfigFields) => ModelSpec> = new Map<ModelFamily, (f: ConfigFields) => ModelSpec>([
  ['qwen3_moe', parseQwen3Moe],
  ['mixtral', parseMixtral],
  ['gpt_oss', parseGptOss],
  ['deepseek_v3', parseDeepseekV3],
]);

/**
 * `model_type` values of other names for a family's architecture: Kimi-K2 ships `kimi_k2` with
 * DeepseekV3ForCausalLM and DeepSeek-V3's config keys.
 */
const ALIASES: ReadonlyMap<string, ModelFamily> = new Map<string, ModelFamily>([['kimi_k2', 'deepseek_v3']]);

/** The HF `model_type` values {@link parseModelConfig} accepts. */
export const SUPPORTED_MODEL_TYPES: readonly ModelFamily[] = [...PARSERS.keys()] as ModelFamily[];

/**
 * Parses the JSON of an HF `config.json` into a {@link ModelSpec}, filling absent fields with the
 * defaults HF transformers 5 applies for that `model_type`.
 *
 * @param json the parsed file contents
 * @param source where it came from (a path), named in every error and kept as `spec.source`
 * @throws MoeflashError `CONFIG_INVALID` for a missing or ill-typed field or inconsistent fields;
 *   `CONFIG_UNSUPPORTED` for a model type, RoPE type or quantization moeflash does not run
 */
export function parseModelConfig(json: unknown, source: string): ModelSpec {
  if (!isPlainObject(json)) {
    throw invalidConfig(source, `expected a JSON object at the top level, found ${describeValue(json)}`);
  }
  const f = new ConfigFields(json, source);
  const modelType = f.requireString('model_type');
  const parse = PARSERS.get(ALIASES.get(modelType) ?? modelType);
  if (parse === undefined) {
    throw unsupportedConfig(
      source,
      `"model_type" is ${JSON.stringify(modelType)}, which moeflash does not run; supported model types: ${SUPPORTED_MODEL_TYPES.join(', ')}`,
    );
  }
  return parse(f);
}

function errorCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err ? String((err as { code: unknown }).code) : undefined;
}

/** Reads `<dir>/config.json` and parses it with {@link parseModelConfig}. */
export async function loadModelSpec(dir: string): Promise<ModelSpec> {
  const folder = resolve(dir);
  const file = resolve(folder, 'config.json');
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    const code = errorCode(err);
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      const info = await stat(folder).catch(() => null);
      const why =
        info === null
          ? `the model folder ${folder} does not exist`
          : !info.isDirectory()
            ? `${folder} is a file, not a model folder`
            : `${file} does not exist`;
      throw new MoeflashError(
        'CONFIG_INVALID',
        `${why}: a model folder needs the config.json that comes with the checkpoint ` +
          '(the Hugging Face layout: config.json, *.safetensors, tokenizer files)',
        { cause: err },
      );
    }
    throw new MoeflashError('CONFIG_INVALID', `could not read ${file}: ${(err as Error).message}`, { cause: err });
  }

  return parseModelConfigText(text, file);
}

/** The text of a `config.json` (read from `file`, named in errors) -> {@link ModelSpec}. */
export function parseModelConfigText(text: string, file: string): ModelSpec {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new MoeflashError('CONFIG_INVALID', `${file} is not valid JSON: ${(err as Error).message}`, { cause: err });
  }
  return parseModelConfig(json, file);
}
