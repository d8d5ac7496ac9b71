// Parsing and validation of OpenAI-style request bodies. Pure functions: they take the parsed
// JSON and the server's limits and return engine options, or throw an ApiError whose message
// names the offending field, as OpenAI's API does.

import { ApiError, bad, boolean, describe, given, integer, number, unsupported } from './fields.mjs';
import { parseAssistantToolCalls, parseTools } from './validate-tools.mjs';
import { checkFormatWithTools, checkIgnoreEos, parseChatLogprobs, parseCompletionLogprobs, parseResponseFormat } from './validate-output.mjs';

export { ApiError };

const ROLES = new Set(['system', 'developer', 'user', 'assistant', 'tool']);
const MAX_STOP = 4;
const MAX_STOP_LENGTH = 256;
const MAX_MESSAGES = 4096;

/**
 * Fields shared by both endpoints: model, sampling, limits, streaming.
 * @param {Record<string, unknown>} body
 * @param {import('./server.mjs').ServerLimits} limits
 * @param {'chat' | 'completion'} kind
 */
function common(body, limits, kind) {
  if (typeof body.model !== 'string' || body.model.length === 0) {
    throw bad('model', `'model' is required and must be a non-empty string; got ${describe(body.model)}`);
  }
  if (body.model !== limits.modelId) {
    throw new ApiError(404, `The model '${body.model.slice(0, 200)}' does not exist; this server serves '${limits.modelId}' (GET /v1/models)`, { param: 'model', code: 'model_not_found' });
  }
  const maxKey = kind === 'chat' && given(body, 'max_completion_tokens') ? 'max_completion_tokens' : 'max_tokens';
  const maxTokens = integer(body, maxKey, { min: 1, max: limits.maxTokensLimit }) ?? limits.defaultMaxTokens;
  const n = integer(body, 'n', { min: 1, max: 128 });
  if (n !== undefined && n !== 1) throw unsupported('n', `'n' other than 1`);
  const temperature = number(body, 'temperature', { min: 0, max: 2 });
  const topP = number(body, 'top_p', { min: 0, max: 1, minExclusive: true });
  const topK = integer(body, 'top_k', { min: 0, max: 1 << 30 });
  const minP = number(body, 'min_p', { min: 0, max: 1 });
  const seed = integer(body, 'seed', { min: 0, max: Number.MAX_SAFE_INTEGER });
  for (const key of ['presence_penalty', 'frequency_penalty']) {
    const v = number(body, key, { min: -2, max: 2 });
    if (v !== undefined && v !== 0) throw unsupported(key, `'${key}' other than 0`);
  }
  const repetition = number(body, 'repetition_penalty', { min: 0, max: 10, minExclusive: true });
  if (repetition !== undefined && repetition !== 1) throw unsupported('repetition_penalty', `'repetition_penalty' other than 1`);
  if (given(body, 'logit_bias')) {
    const lb = body.logit_bias;
    if (typeof lb !== 'object' || Array.isArray(lb)) throw bad('logit_bias', `'logit_bias' must be an object; got ${describe(lb)}`);
    if (Object.keys(lb).length) throw unsupported('logit_bias', `'logit_bias'`);
  }
  let stop;
  if (given(body, 'stop')) {
    const s = body.stop;
    const list = typeof s === 'string' ? [s] : s;
    if (!Array.isArray(list) || list.length > MAX_STOP || !list.every((x) => typeof x === 'string' && x.length > 0 && x.length <= MAX_STOP_LENGTH)) {
      throw bad('stop', `'stop' must be a non-empty string or an array of at most ${MAX_STOP} non-empty strings of at most ${MAX_STOP_LENGTH} characters; got ${describe(s)}`);
    }
    stop = list;
  }
  const stream = boolean(body, 'stream') ?? false;
  let includeUsage = false;
  if (given(body, 'stream_options')) {
    const so = body.stream_options;
    if (!stream) throw bad('stream_options', `'stream_options' is only allowed when 'stream' is true`);
    if (typeof so !== 'object' || Array.isArray(so)) throw bad('stream_options', `'stream_options' must be an object; got ${describe(so)}`);
    includeUsage = boolean(so, 'include_usage') ?? false;
  }
  const ignoreEos = boolean(body, 'ignore_eos');
  const priority = integer(body, 'priority', { min: -1000, max: 1000 });
  if (given(body, 'user') && typeof body.user !== 'string') throw bad('user', `'user' must be a string; got ${describe(body.user)}`);
  return {
    stream,
    includeUsage,
    options: {
      maxTokens,
      temperature: temperature ?? 1,
      ...(topP !== undefined && { topP }),
      ...(topK !== undefined && { topK }),
      ...(minP !== undefined && { minP }),
      ...(seed !== undefined && { seed }),
      ...(stop && { stop }),
      ...(ignoreEos !== undefined && { ignoreEos }),
      ...(priority !== undefined && { priority }),
    },
  };
}

function object(body) {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw bad(null, `the request body must be a JSON object; got ${describe(body)}`);
  }
  return body;
}

/** Text of a message's content: a string, or an array of text parts. */
function content(c, i, role) {
  const param = `messages[${i}].content`;
  if (c === null || c === undefined) {
    if (role === 'assistant') return '';
    throw bad(param, `'${param}' is required for role '${role}'`);
  }
  if (typeof c === 'string') return c;
  if (!Array.isArray(c)) throw bad(param, `'${param}' must be a string or an array of content parts; got ${describe(c)}`);
  let text = '';
  c.forEach((part, j) => {
    if (part === null || typeof part !== 'object' || Array.isArray(part)) throw bad(`${param}[${j}]`, `'${param}[${j}]' must be a content part object; got ${describe(part)}`);
    if (part.type !== 'text') {
      throw new ApiError(400, `content parts of type ${describe(part.type)} are not supported; only 'text'`, { param: `${param}[${j}].type`, code: 'unsupported_parameter' });
    }
    if (typeof part.text !== 'string') throw bad(`${param}[${j}].text`, `'${param}[${j}].text' must be a string; got ${describe(part.text)}`);
    text += part.text;
  });
  return text;
}

/**
 * POST /v1/chat/completions.
 * @param {unknown} raw
 * @param {import('./server.mjs').ServerLimits} limits
 */
export function parseChatRequest(raw, limits) {
  const body = object(raw);
  const msgs = body.messages;
  if (!Array.isArray(msgs) || msgs.length === 0 || msgs.length > MAX_MESSAGES) {
    throw bad('messages', `'messages' must be a non-empty array of at most ${MAX_MESSAGES} messages; got ${describe(msgs)}`);
  }
  const messages = msgs.map((m, i) => {
    if (m === null || typeof m !== 'object' || Array.isArray(m)) throw bad(`messages[${i}]`, `'messages[${i}]' must be an object; got ${describe(m)}`);
    if (typeof m.role !== 'string' || !ROLES.has(m.role)) {
      throw bad(`messages[${i}].role`, `'messages[${i}].role' must be one of ${[...ROLES].join(', ')}; got ${describe(m.role)}`);
    }
    const role = m.role === 'developer' ? 'system' : m.role;
    const out = { role, content: content(m.content, i, m.role) };
    if (given(m, 'name')) {
      if (typeof m.name !== 'string') throw bad(`messages[${i}].name`, `'messages[${i}].name' must be a string; got ${describe(m.name)}`);
      out.name = m.name;
    }
    if (given(m, 'tool_calls')) out.tool_calls = parseAssistantToolCalls(m.tool_calls, i);
    if (given(m, 'tool_call_id')) {
      if (typeof m.tool_call_id !== 'string') throw bad(`messages[${i}].tool_call_id`, `'messages[${i}].tool_call_id' must be a string; got ${describe(m.tool_call_id)}`);
      out.tool_call_id = m.tool_call_id;
    }
    return out;
  });
  const c = common(body, limits, 'chat');
  const { tools, toolChoice } = parseTools(body);
  const responseFormat = parseResponseFormat(body);
  checkFormatWithTools(responseFormat, tools, toolChoice);
  const forced = tools?.length && toolChoice !== undefined && toolChoice !== 'auto' && toolChoice !== 'none';
  checkIgnoreEos(responseFormat ? 'response_format' : forced ? 'tool_choice' : null, c.options.ignoreEos);
  const options = { ...c.options, ...parseChatLogprobs(body), ...(responseFormat && { responseFormat }) };
  return { ...c, options, messages, tools, toolChoice };
}

/**
 * POST /v1/completions.
 * @param {unknown} raw
 * @param {import('./server.mjs').ServerLimits} limits
 */
export function parseCompletionRequest(raw, limits) {
  const body = object(raw);
  let p = body.prompt;
  // One prompt only: a string, token ids, or a one-element batch of either.
  if (Array.isArray(p) && p.length === 1 && (typeof p[0] === 'string' || Array.isArray(p[0]))) p = p[0];
  let prompt;
  if (typeof p === 'string') {
    if (p.length === 0) throw bad('prompt', `'prompt' must not be empty`);
    prompt = p;
  } else if (Array.isArray(p) && p.length > 0 && p.every((t) => typeof t === 'number')) {
    const bound = limits.vocabSize;
    const wrong = p.find((t) => !Number.isInteger(t) || t < 0 || t >= bound);
    if (wrong !== undefined) throw bad('prompt', `'prompt' token ids must be integers in [0, ${bound}); got ${describe(wrong)}`);
    prompt = p;
  } else if (Array.isArray(p) && p.length > 1) {
    throw unsupported('prompt', 'a batch of several prompts');
  } else {
    throw bad('prompt', `'prompt' must be a non-empty string or a non-empty array of token ids; got ${describe(p)}`);
  }
  const c = common(body, limits, 'completion');
  if (boolean(body, 'echo')) throw unsupported('echo', `'echo'`);
  if (given(body, 'suffix')) throw unsupported('suffix', `'suffix'`);
  const bestOf = integer(body, 'best_of', { min: 1, max: 128 });
  if (bestOf !== undefined && bestOf !== 1) throw unsupported('best_of', `'best_of' other than 1`);
  const responseFormat = parseResponseFormat(body);
  checkIgnoreEos(responseFormat ? 'response_format' : null, c.options.ignoreEos);
  const options = { ...c.options, ...parseCompletionLogprobs(body), ...(responseFormat && { responseFormat }) };
  return { ...c, options, prompt };
}
