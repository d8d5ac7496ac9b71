import { readFile } from 'node:fs/promises';
import { MoeflashError, type ErrorCode } from '../errors.js';

/** Reads a text file; `null` when it does not exist, an error naming the path for anything else. */
export async function readOptionalText(path: string, code: ErrorCode): Promise<string | null> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    if (isNotFound(err)) return null;
    throw new MoeflashError(code, `cannot read ${path}: ${describe(err)}`, { cause: err });
  }
}

/**
 * Reads and parses a JSON file whose top level must be an object. `null` when the file does not
 * exist, so callers decide whether that is an error.
 */
export async function readOptionalJsonObject(
  path: string,
  code: ErrorCode,
): Promise<Record<string, unknown> | null> {
  const text = await readOptionalText(path, code);
  return text === null ? null : parseJsonObject(text, path, code);
}

/** Parses the text of a JSON file (read from `path`, named in errors) whose top level must be an object. */
export function parseJsonObject(text: string, path: string, code: ErrorCode): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new MoeflashError(code, `${path} is not valid JSON: ${describe(err)}`, { cause: err });
  }
  if (!isPlainObject(value)) {
    throw new MoeflashError(code, `${path} must hold a JSON object at the top level`);
  }
  return value;
}

export function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isNotFound(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'ENOENT' || code === 'ENOTDIR';
}

export function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * tokenizer_config.json names special tokens either as a plain string or, in files written by
 * older transformers, as a serialized AddedToken object `{ "content": "...", ... }`.
 */
export function tokenContent(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  if (isPlainObject(value) && typeof value.content === 'string') return value.content;
  return undefined;
}
