/**
 * Typed reads of one JSON object out of a model's `config.json`. Every failure is a
 * `CONFIG_INVALID` {@link MoeflashError} naming the file, the field (with its path for nested
 * objects such as `rope_scaling.factor`), the type that was expected and the value found, so a
 * user can fix the file without reading our source.
 */
import { MoeflashError } from '../errors.js';

/** Bounds on an integer field; `min` defaults to 1 (sizes and counts are positive). */
export interface IntRange {
  min?: number;
  max?: number;
}

/** Bounds on a real-valued field. */
export interface NumberRange {
  /** The value must be strictly greater than 0. */
  positive?: boolean;
  min?: number;
  max?: number;
}

/** A CONFIG_INVALID error for a problem that involves more than one field. */
export function invalidConfig(source: string, message: string): MoeflashError {
  return new MoeflashError('CONFIG_INVALID', `${source}: ${message}`);
}

/** A CONFIG_UNSUPPORTED error: the file is well formed, but describes something we do not run. */
export function unsupportedConfig(source: string, message: string): MoeflashError {
  return new MoeflashError('CONFIG_UNSUPPORTED', `${source}: ${message}`);
}

/** Renders a JSON value for an error message, short enough to stay on one line. */
export function describeValue(value: unknown): string {
  if (value === undefined) return 'nothing (the field is missing)';
  if (value === null) return 'null';
  const kind = Array.isArray(value)
    ? 'a list'
    : typeof value === 'object'
      ? 'an object'
      : typeof value === 'string'
        ? 'a string'
        : typeof value === 'number'
          ? 'a number'
          : typeof value === 'boolean'
            ? 'a boolean'
            : typeof value;
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  if (text.length > 80) text = `${text.slice(0, 77)}...`;
  return `${text} (${kind})`;
}

export function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function intExpectation(range: IntRange): string {
  const min = range.min ?? 1;
  const max = range.max;
  if (max !== undefined) return `an integer from ${min} to ${max}`;
  if (min === 1) return 'a positive integer';
  if (min === 0) return 'a non-negative integer';
  return `an integer >= ${min}`;
}

function numberExpectation(range: NumberRange): string {
  const parts: string[] = [];
  if (range.positive) parts.push('> 0');
  if (range.min !== undefined) parts.push(`>= ${range.min}`);
  if (range.max !== undefined) parts.push(`<= ${range.max}`);
  return parts.length === 0 ? 'a number' : `a number ${parts.join(' and ')}`;
}

function intInRange(value: unknown, range: IntRange): value is number {
  return (
    typeof value === 'number' &&
    Number.isSafeInteger(value) &&
    value >= (range.min ?? 1) &&
    (range.max === undefined || value <= range.max)
  );
}

function numberInRange(value: unknown, range: NumberRange): value is number {
  return (
    typeof value === 'number' &&
    Number.isFinite(value) &&
    (!range.positive || value > 0) &&
    (range.min === undefined || value >= range.min) &&
    (range.max === undefined || value <= range.max)
  );
}

/**
 * One JSON object of a config file. HF writes `null` for many unset fields, so the optional
 * readers treat `null` like an absent key unless a reader says otherwise ({@link nullableInt}).
 */
export class ConfigFields {
  constructor(
    readonly data: Readonly<Record<string, unknown>>,
    /** The file the object came from, for messages. */
    readonly source: string,
    /** Dotted path of this object inside the file (`''` at the top, `'rope_scaling.'` below it). */
    readonly prefix = '',
  ) {}

  /** The field's name as a user would look for it in the file. */
  name(key: string): string {
    return `${this.prefix}${key}`;
  }

  /** Present with a value other than null. */
  has(key: string): boolean {
    return this.raw(key) !== undefined && this.raw(key) !== null;
  }

  /** Present at all, even as null. */
  hasKey(key: string): boolean {
    return Object.prototype.hasOwnProperty.call(this.data, key);
  }

  raw(key: string): unknown {
    return this.hasKey(key) ? this.data[key] : undefined;
  }

  /** A CONFIG_INVALID error about one field. */
  fail(key: string, expected: string, value: unknown = this.raw(key)): MoeflashError {
    if (value === undefined) {
      return invalidConfig(this.source, `field "${this.name(key)}" is required (${expected}) but is missing`);
    }
    return invalidConfig(this.source, `field "${this.name(key)}" must be ${expected}, found ${describeValue(value)}`);
  }

  requireInt(key: string, range: IntRange = {}): number {
    const value = this.raw(key);
    if (!intInRange(value, range)) throw this.fail(key, intExpectation(range), value);
    return value;
  }

  /** Absent or null: `fallback`. */
  optionalInt(key: string, fallback: number, range: IntRange = {}): number {
    return this.has(key) ? this.requireInt(key, range) : fallback;
  }

  /** Absent: `fallback`; null: null (for fields where null means "off", like `sliding_window`). */
  nullableInt(key: string, fallback: number | null, range: IntRange = {}): number | null {
    if (!this.hasKey(key)) return fallback;
    if (this.raw(key) === null) return null;
    const value = this.raw(key);
    if (!intInRange(value, range)) throw this.fail(key, `${intExpectation(range)} or null`, value);
    return value;
  }

  requireNumber(key: string, range: NumberRange = {}): number {
    const value = this.raw(key);
    if (!numberInRange(value, range)) throw this.fail(key, numberExpectation(range), value);
    return value;
  }

  optionalNumber(key: string, fallback: number, range: NumberRange = {}): number {
    return this.has(key) ? this.requireNumber(key, range) : fallback;
  }

  /** Absent or null: undefined. */
  maybeNumber(key: string, range: NumberRange = {}): number | undefined {
    return this.has(key) ? this.requireNumber(key, range) : undefined;
  }

  optionalBool(key: string, fallback: boolean): boolean {
    if (!this.has(key)) return fallback;
    const value = this.raw(key);
    if (typeof value !== 'boolean') throw this.fail(key, 'true or false', value);
    return value;
  }

  requireString(key: string): string {
    const value = this.raw(key);
    if (typeof value !== 'string' || value.length === 0) throw this.fail(key, 'a non-empty string', value);
    return value;
  }

  optionalString(key: string, fallback: string): string {
    return this.has(key) ? this.requireString(key) : fallback;
  }

  /** Absent or null: `fallback`. A bad item is reported by its index (`mlp_only_layers[3]`). */
  optionalIntList(key: string, fallback: number[], range: IntRange = {}): number[] {
    if (!this.has(key)) return fallback;
    const value = this.raw(key);
    if (!Array.isArray(value)) throw this.fail(key, 'a list of integers', value);
    const bad = value.findIndex((v) => !intInRange(v, range));
    if (bad >= 0) throw this.fail(`${key}[${bad}]`, intExpectation(range), value[bad]);
    return [...value] as number[];
  }

  /** Absent or null: undefined. */
  maybeStringList(key: string): string[] | undefined {
    if (!this.has(key)) return undefined;
    const value = this.raw(key);
    if (!Array.isArray(value)) throw this.fail(key, 'a list of strings', value);
    const bad = value.findIndex((v) => typeof v !== 'string');
    if (bad >= 0) throw this.fail(`${key}[${bad}]`, 'a string', value[bad]);
    return [...value] as string[];
  }

  /** A nested object, or null when absent or null. */
  maybeObject(key: string): ConfigFields | null {
    if (!this.has(key)) return null;
    const value = this.raw(key);
    if (!isPlainObject(value)) throw this.fail(key, 'an object', value);
    return new ConfigFields(value, this.source, `${this.name(key)}.`);
  }
}
