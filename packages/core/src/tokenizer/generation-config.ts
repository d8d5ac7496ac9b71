import { join } from 'node:path';
import { MoeflashError } from '../errors.js';
import { readOptionalJsonObject } from './files.js';

/**
 * The parts of a model's generation_config.json that the engine uses: stop ids and the sampling
 * defaults the model's authors chose. Absent fields are undefined; the caller's options win.
 */
export interface GenerationConfig {
  /** Path of the file read, or null when the folder has none. */
  source: string | null;
  /** `eos_token_id`, a single id or a list in the file; empty when absent. */
  eosTokenIds: number[];
  bosTokenId?: number;
  padTokenId?: number;
  /**
   * transformers samples only when this is true; without it, it decodes greedily and ignores the
   * temperature and top-k/p fields.
   */
  doSample?: boolean;
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  repetitionPenalty?: number;
  maxNewTokens?: number;
  /** Prompt plus generated tokens. */
  maxLength?: number;
}

type Check = (value: unknown) => boolean;
const isId: Check = (v) => Number.isInteger(v) && (v as number) >= 0;
const isNonNegative: Check = (v) => typeof v === 'number' && Number.isFinite(v) && v >= 0;
const isProbability: Check = (v) => typeof v === 'number' && v >= 0 && v <= 1;
const isCount: Check = (v) => Number.isInteger(v) && (v as number) >= 0;
const isPositiveCount: Check = (v) => Number.isInteger(v) && (v as number) > 0;

/** Validates the fields of a parsed generation_config.json; `source` names it in errors. */
export function parseGenerationConfig(json: Record<string, unknown>, source: string | null): GenerationConfig {
  const where = source ?? 'generation config';
  const field = <T>(key: string, check: Check, expected: string): T | undefined => {
    const value = json[key];
    // transformers writes null for fields it leaves unset.
    if (value === undefined || value === null) return undefined;
    if (!check(value)) {
      throw new MoeflashError('CONFIG_INVALID', `${where}: "${key}" must be ${expected}, got ${JSON.stringify(value)}`);
    }
    return value as T;
  };

  let eosTokenIds: number[] = [];
  const eos = json.eos_token_id;
  if (eos !== undefined && eos !== null) {
    const list = Array.isArray(eos) ? eos : [eos];
    if (!list.every(isId)) {
      throw new MoeflashError(
        'CONFIG_INVALID',
        `${where}: "eos_token_id" must be a token id or a list of token ids, got ${JSON.stringify(eos)}`,
      );
    }
    eosTokenIds = dedupe(list as number[]);
  }

  const config: GenerationConfig = { source, eosTokenIds };
  const set = <K extends keyof GenerationConfig>(key: K, value: GenerationConfig[K] | undefined) => {
    if (value !== undefined) config[key] = value;
  };
  set('bosTokenId', field<number>('bos_token_id', isId, 'a token id'));
  set('padTokenId', field<number>('pad_token_id', isId, 'a token id'));
  set('doSample', field<boolean>('do_sample', (v) => typeof v === 'boolean', 'true or false'));
  set('temperature', field<number>('temperature', isNonNegative, 'a number >= 0'));
  set('topK', field<number>('top_k', isCount, 'an integer >= 0'));
  set('topP', field<number>('top_p', isProbability, 'a number in [0, 1]'));
  set('minP', field<number>('min_p', isProbability, 'a number in [0, 1]'));
  set('repetitionPenalty', field<number>('repetition_penalty', (v) => isNonNegative(v) && (v as number) > 0, 'a number > 0'));
  set('maxNewTokens', field<number>('max_new_tokens', isPositiveCount, 'an integer > 0'));
  set('maxLength', field<number>('max_length', isPositiveCount, 'an integer > 0'));
  return config;
}

/** Reads `dir/generation_config.json`; a folder without one gives an empty config. */
export async function loadGenerationConfig(dir: string): Promise<GenerationConfig> {
  const path = join(dir, 'generation_config.json');
  const json = await readOptionalJsonObject(path, 'CONFIG_INVALID');
  if (json === null) return { source: null, eosTokenIds: [] };
  return parseGenerationConfig(json, path);
}

/**
 * Every id that ends a generation: config.json's `eos_token_id`, generation_config.json's list
 * (chat models add their end-of-turn token there) and the tokenizer's eos token, without repeats,
 * in that order.
 */
export function stopTokenIds(
  specEosIds: number | readonly number[] | null | undefined,
  genConfig?: Pick<GenerationConfig, 'eosTokenIds'> | null,
  tokenizer?: { readonly eosTokenId: number | null } | null,
): number[] {
  const all: number[] = [];
  if (typeof specEosIds === 'number') all.push(specEosIds);
  else if (specEosIds) all.push(...specEosIds);
  if (genConfig) all.push(...genConfig.eosTokenIds);
  if (tokenizer && tokenizer.eosTokenId !== null) all.push(tokenizer.eosTokenId);
  for (const id of all) {
    if (!isId(id)) throw new MoeflashError('INVALID_ARGUMENT', `stop token id ${String(id)} is not a non-negative integer`);
  }
  return dedupe(all);
}

function dedupe(ids: readonly number[]): number[] {
  return [...new Set(ids)];
}
