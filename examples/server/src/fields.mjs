// The error the API answers with, and readers of single request fields that throw it. Shared by
// the request parsers (validate.mjs and the tools and output-format parsers it calls).

/** An error answered with OpenAI's error JSON: { error: { message, type, param, code } }. */
export class ApiError extends Error {
  /**
   * @param {number} status
   * @param {string} message
   * @param {{ type?: string, param?: string | null, code?: string | null }} [opts]
   */
  constructor(status, message, opts = {}) {
    super(message);
    this.status = status;
    this.type = opts.type ?? (status >= 500 ? 'server_error' : 'invalid_request_error');
    this.param = opts.param ?? null;
    this.code = opts.code ?? null;
  }

  toJSON() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export const bad = (param, message, code = null) => new ApiError(400, message, { param, code });

export function unsupported(param, what) {
  return new ApiError(400, `${what} is not supported by this server`, { param, code: 'unsupported_parameter' });
}

/** A value as an error message shows it: short, and never the whole of a long string. */
export function describe(v) {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return v.length > 40 ? `a string of ${v.length} characters` : JSON.stringify(v);
  if (typeof v === 'number') return String(v);
  return typeof v === 'object' ? 'an object' : String(v);
}

export const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

/** Absent and null both mean "use the default", as in OpenAI's API. */
export const given = (body, key) => body[key] !== undefined && body[key] !== null;

export function number(body, key, { min, max, minExclusive = false }) {
  if (!given(body, key)) return undefined;
  const v = body[key];
  if (typeof v !== 'number' || !Number.isFinite(v) || (minExclusive ? v <= min : v < min) || v > max) {
    throw bad(key, `'${key}' must be a number in ${minExclusive ? '(' : '['}${min}, ${max}]; got ${describe(v)}`);
  }
  return v;
}

export function integer(body, key, { min, max }) {
  if (!given(body, key)) return undefined;
  const v = body[key];
  if (!Number.isSafeInteger(v) || v < min || v > max) {
    throw bad(key, `'${key}' must be an integer in [${min}, ${max}]; got ${describe(v)}`);
  }
  return v;
}

export function boolean(body, key) {
  if (!given(body, key)) return undefined;
  if (typeof body[key] !== 'boolean') throw bad(key, `'${key}' must be a boolean; got ${describe(body[key])}`);
  return body[key];
}
