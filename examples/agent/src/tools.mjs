// The agent's JavaScript tools. Each is { name, description, parameters, run(args) }: parameters is
// the JSON schema the model's arguments are constrained to (and checked against again here, since
// a model left free may write anything); run returns a JSON-able value or throws ToolError, which
// the loop hands back to the model as an error result.
import fs from 'node:fs/promises';
import path from 'node:path';
import { evaluate } from './calculator.mjs';

export class ToolError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ToolError';
  }
}

/** The one string argument `key` of `args`, or a ToolError saying what was expected. */
function stringArg(args, key) {
  const v = args?.[key];
  if (typeof v !== 'string' || v.length === 0) throw new ToolError(`"${key}" must be a non-empty string; got ${JSON.stringify(v)}`);
  return v;
}

/** `text` cut to `max` characters, and whether it was cut. */
function clip(text, max) {
  return text.length > max ? { text: text.slice(0, max), truncated: true } : { text, truncated: false };
}

/** Whether `p` (absolute) is `root` or inside it. */
function inside(root, p) {
  const rel = path.relative(root, p);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/** Regular files under `root` (symbolic links left out), as relative paths with '/' (for a read_file `choices` list). */
export async function listFiles(root, { limit = 50 } = {}) {
  const out = [];
  async function walk(dir) {
    for (const e of (await fs.readdir(dir, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name))) {
      if (out.length >= limit) return;
      const full = path.join(dir, e.name);
      if (e.isDirectory()) await walk(full);
      else if (e.isFile()) out.push(path.relative(root, full).split(path.sep).join('/'));
    }
  }
  await walk(root);
  return out;
}

/**
 * read_file: a text file inside `root`, nothing outside it. Absolute paths, `..` that leaves the
 * folder and symbolic links that point out of it are refused. With `choices` the model's path is
 * constrained to that list (an enum); without, to a short path-like string.
 */
export function readFileTool({ root, choices, maxChars = 1000 }) {
  const rootReal = fs.realpath(path.resolve(root));
  rootReal.catch(() => {});
  return {
    name: 'read_file',
    description: 'Read a text file of the workspace folder. path is relative to that folder.',
    parameters: {
      type: 'object',
      properties: { path: choices ? { type: 'string', enum: choices } : { type: 'string', pattern: '^[A-Za-z0-9_.][A-Za-z0-9_./-]{0,63}$' } },
      required: ['path'],
    },
    async run(args) {
      const rel = stringArg(args, 'path');
      if (rel.includes('\0')) throw new ToolError('the path holds a NUL character');
      if (path.isAbsolute(rel)) throw new ToolError(`absolute paths are not allowed ("${rel}"): give a path relative to the workspace folder`);
      const base = await rootReal;
      const wanted = path.resolve(base, rel);
      if (!inside(base, wanted)) throw new ToolError(`"${rel}" is outside the workspace folder; only files inside it can be read`);
      let real;
      try {
        real = await fs.realpath(wanted);
      } catch (e) {
        if (e.code === 'ENOENT') throw new ToolError(`no such file: "${rel}"`);
        throw new ToolError(`cannot open "${rel}": ${e.code ?? e.message}`);
      }
      if (!inside(base, real)) throw new ToolError(`"${rel}" links outside the workspace folder; only files inside it can be read`);
      const st = await fs.stat(real);
      if (!st.isFile()) throw new ToolError(`"${rel}" is not a regular file`);
      const { text, truncated } = clip(await fs.readFile(real, 'utf8'), maxChars);
      return { path: rel, bytes: st.size, text, truncated };
    },
  };
}

/** calculator: arithmetic through calculator.mjs's parser (no eval). */
export function calculatorTool() {
  return {
    name: 'calculator',
    description: 'Evaluate an arithmetic expression: numbers, + - * / % ^, parentheses, sqrt abs round floor ceil min max, pi, e.',
    parameters: {
      type: 'object',
      properties: { expression: { type: 'string', pattern: '^[0-9+*/%^(). -]{1,40}$' } },
      required: ['expression'],
    },
    async run(args) {
      const expression = stringArg(args, 'expression');
      try {
        return { expression, value: evaluate(expression) };
      } catch (e) {
        throw new ToolError(e.message);
      }
    },
  };
}

/**
 * http_get: GET a path of one HTTP service (`baseUrl`, which the host chooses; the model only
 * names the path, and a path that leads to another origin is refused). With `routes` the path is
 * constrained to that list. Redirects are not followed; the body is cut at `maxChars`.
 */
export function httpGetTool({ baseUrl, routes, timeoutMs = 3000, maxChars = 1000 }) {
  const base = new URL(baseUrl);
  return {
    name: 'http_get',
    description: 'GET a path of the local HTTP service and return the status and body.',
    parameters: {
      type: 'object',
      properties: { path: routes ? { type: 'string', enum: routes } : { type: 'string', pattern: '^/[A-Za-z0-9/_.-]{0,40}$' } },
      required: ['path'],
    },
    async run(args) {
      const p = stringArg(args, 'path');
      let url;
      try {
        url = new URL(p, base);
      } catch {
        throw new ToolError(`not a URL path: "${p}"`);
      }
      if (url.origin !== base.origin) throw new ToolError(`"${p}" leads to ${url.origin}; only ${base.origin} can be fetched`);
      let res;
      try {
        res = await fetch(url, { redirect: 'manual', signal: AbortSignal.timeout(timeoutMs) });
      } catch (e) {
        throw new ToolError(`GET ${url.pathname} failed: ${e.cause?.code ?? e.cause?.message ?? e.message}`);
      }
      const { text, truncated } = clip(await res.text(), maxChars);
      return { status: res.status, contentType: res.headers.get('content-type'), body: text, truncated };
    },
  };
}

/** final_answer: the model's way to end the loop with an answer. */
export function finalAnswerTool({ maxLength = 200 } = {}) {
  return {
    name: 'final_answer',
    description: 'Give the final answer to the task. Call this last.',
    parameters: { type: 'object', properties: { answer: { type: 'string', maxLength } }, required: ['answer'] },
    final: true,
    async run(args) {
      const answer = args?.answer;
      if (typeof answer !== 'string') throw new ToolError(`"answer" must be a string; got ${JSON.stringify(answer)}`);
      return answer;
    },
  };
}
