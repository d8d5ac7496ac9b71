// The fields that shape what a request returns: `response_format` (output constrained to JSON or
// to a JSON schema) and log-probabilities (`logprobs` / `top_logprobs` for chat, the legacy
// integer `logprobs` for text completions).
import { bad, boolean, describe, given, integer, isObject } from './fields.mjs';

/** Most alternatives a token reports: the engine's limit (OpenAI's is 20 for chat, 5 for completions). */
export const MAX_TOP_LOGPROBS = 20;

const SCHEMA_EXAMPLE = `{ type: 'json_schema', json_schema: { name: 'answer', schema: { type: 'object', properties: { ok: { type: 'boolean' } }, required: ['ok'] } } }`;

/**
 * `response_format` as the engine's `responseFormat`, or undefined for free text.
 * @returns {import('@moeflash/core').ResponseFormat | undefined}
 */
export function parseResponseFormat(body) {
  if (!given(body, 'response_format')) return undefined;
  const rf = body.response_format;
  if (!isObject(rf) || typeof rf.type !== 'string') {
    throw bad('response_format', `'response_format' must be an object with a 'type' ('text', 'json_object' or 'json_schema'); got ${describe(rf)}`);
  }
  switch (rf.type) {
    case 'text':
      return undefined;
    case 'json_object':
      return { type: 'json_object' };
    case 'json_schema': {
      const js = rf.json_schema;
      if (!isObject(js)) {
        const hint = given(rf, 'schema') ? `put the schema under 'json_schema': ` : 'for example ';
        throw bad('response_format.json_schema', `'response_format.json_schema' must be an object { name, schema }; ${hint}${SCHEMA_EXAMPLE}`);
      }
      if (!(isObject(js.schema) || js.schema === true)) {
        throw bad('response_format.json_schema.schema', `'response_format.json_schema.schema' must be a JSON Schema object; got ${describe(js.schema)}; for example ${SCHEMA_EXAMPLE}`);
      }
      if (given(js, 'name') && typeof js.name !== 'string') {
        throw bad('response_format.json_schema.name', `'response_format.json_schema.name' must be a string; got ${describe(js.name)}`);
      }
      // 'strict' adds nothing: every token is held to the schema.
      return { type: 'json_schema', schema: js.schema, ...(typeof js.name === 'string' && { name: js.name }) };
    }
    default:
      throw bad('response_format.type', `'response_format.type' must be 'text', 'json_object' or 'json_schema'; got ${describe(rf.type)}`);
  }
}

/**
 * Chat's `logprobs` (a boolean) and `top_logprobs` (alternatives a token, 0 to 20).
 * @returns {{ logprobs?: true, topLogprobs?: number }}
 */
export function parseChatLogprobs(body) {
  const on = boolean(body, 'logprobs') ?? false;
  const top = integer(body, 'top_logprobs', { min: 0, max: MAX_TOP_LOGPROBS });
  if (top && !on) throw bad('top_logprobs', `'top_logprobs' needs 'logprobs': true; add it, or leave out 'top_logprobs'`);
  return on ? { logprobs: true, topLogprobs: top ?? 0 } : {};
}

/**
 * The legacy `logprobs` of /v1/completions: the number of alternatives a token (0 gives the
 * chosen token's log-probability alone).
 * @returns {{ logprobs?: true, topLogprobs?: number }}
 */
export function parseCompletionLogprobs(body) {
  if (!given(body, 'logprobs')) return {};
  if (typeof body.logprobs === 'boolean') {
    throw bad('logprobs', `'logprobs' of /v1/completions is the number of alternatives a token, an integer from 0 to ${MAX_TOP_LOGPROBS} (for example "logprobs": 5), not a boolean`);
  }
  const n = integer(body, 'logprobs', { min: 0, max: MAX_TOP_LOGPROBS });
  return { logprobs: true, topLogprobs: n };
}

/**
 * A request can be held to one output constraint: a JSON response format leaves the model no way
 * to write a tool call, and a forced call already constrains the reply to the tool's schema.
 */
export function checkFormatWithTools(responseFormat, tools, toolChoice) {
  if (!responseFormat || !tools?.length || toolChoice === 'none') return;
  if (toolChoice !== undefined && toolChoice !== 'auto') {
    throw bad('response_format', `'response_format' and a forced tool call ('tool_choice' ${describe(typeof toolChoice === 'string' ? toolChoice : toolChoice.function.name)}) both constrain the reply; leave out 'response_format' (the call's arguments follow the tool's 'parameters' schema)`);
  }
  throw bad('response_format', `'response_format' holds the whole reply to JSON, which leaves the model no way to call the tools; to let it call them leave out 'response_format', to get JSON set 'tool_choice' to 'none' or leave out 'tools'`);
}

/** A constrained reply ends with the model's end-of-sequence token once it is complete: it needs one. */
export function checkIgnoreEos(constrainedBy, ignoreEos) {
  if (!constrainedBy || !ignoreEos) return;
  throw bad('ignore_eos', `'ignore_eos' would keep a reply constrained by '${constrainedBy}' from ending once it is complete; leave out 'ignore_eos' or '${constrainedBy}'`);
}
