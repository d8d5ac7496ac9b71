// The tool fields of a chat request: `tools`, `tool_choice`, and the `tool_calls` of assistant
// messages that send a conversation's earlier calls back. Also the check of a request's tools
// against the model's chat template, which decides whether and how the model can call them.
import { forcedCall, toolCallFormat } from '@moeflash/core';
import { ApiError, bad, describe, given, isObject, unsupported } from './fields.mjs';

/** OpenAI's limit on tools a request. */
const MAX_TOOLS = 128;
/** Names the engine's parsers read: OpenAI's pattern (letters, digits, _ -) and dots. */
const TOOL_NAME = /^[\w.-]{1,64}$/;
const CHOICES = ['auto', 'none', 'required'];

function parseTool(t, i) {
  const at = `tools[${i}]`;
  if (!isObject(t)) throw bad(at, `'${at}' must be an object { type: 'function', function: { name, parameters } }; got ${describe(t)}`);
  if (t.type !== 'function') throw unsupported(`${at}.type`, `tools of type ${describe(t.type)} (only 'function')`);
  const fn = t.function;
  if (!isObject(fn)) throw bad(`${at}.function`, `'${at}.function' must be an object { name, description, parameters }; got ${describe(fn)}`);
  if (typeof fn.name !== 'string' || !TOOL_NAME.test(fn.name)) {
    throw bad(`${at}.function.name`, `'${at}.function.name' must be 1 to 64 letters, digits, _ . or -; got ${describe(fn.name)}`);
  }
  if (given(fn, 'description') && typeof fn.description !== 'string') {
    throw bad(`${at}.function.description`, `'${at}.function.description' must be a string; got ${describe(fn.description)}`);
  }
  if (given(fn, 'parameters') && !isObject(fn.parameters)) {
    throw bad(`${at}.function.parameters`, `'${at}.function.parameters' must be a JSON Schema object, for example { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] }; got ${describe(fn.parameters)}`);
  }
  // What the template renders and the engine constrains calls to; 'strict' adds nothing (calls are always held to the schema).
  const out = { name: fn.name };
  if (given(fn, 'description')) out.description = fn.description;
  if (given(fn, 'parameters')) out.parameters = fn.parameters;
  return { type: 'function', function: out };
}

/**
 * `tools` and `tool_choice`.
 * @returns {{ tools?: import('@moeflash/core').ToolDefinition[], toolChoice?: import('@moeflash/core').ToolChoice }}
 */
export function parseTools(body) {
  for (const key of ['functions', 'function_call']) {
    if (given(body, key)) {
      throw new ApiError(400, `'${key}' (OpenAI's deprecated form of tool calls) is not supported by this server; send 'tools' and 'tool_choice' instead`, { param: key, code: 'unsupported_parameter' });
    }
  }
  let tools;
  if (given(body, 'tools')) {
    if (!Array.isArray(body.tools) || body.tools.length > MAX_TOOLS) {
      throw bad('tools', `'tools' must be an array of at most ${MAX_TOOLS} tools { type: 'function', function: { name, parameters } }; got ${describe(body.tools)}`);
    }
    tools = body.tools.map(parseTool);
    const seen = new Set();
    tools.forEach((t, i) => {
      if (seen.has(t.function.name)) throw bad(`tools[${i}].function.name`, `'tools[${i}].function.name' repeats the name ${describe(t.function.name)}; tool names must be unique`);
      seen.add(t.function.name);
    });
  }
  if (!given(body, 'tool_choice')) return { tools };
  const choice = body.tool_choice;
  if (!tools?.length) {
    throw bad('tool_choice', `'tool_choice' is only allowed when 'tools' are given; add 'tools' or leave out 'tool_choice'`);
  }
  if (typeof choice === 'string') {
    if (!CHOICES.includes(choice)) throw bad('tool_choice', `'tool_choice' must be 'auto', 'none', 'required' or { type: 'function', function: { name } }; got ${describe(choice)}`);
    return { tools, toolChoice: choice };
  }
  if (!isObject(choice)) throw bad('tool_choice', `'tool_choice' must be 'auto', 'none', 'required' or { type: 'function', function: { name } }; got ${describe(choice)}`);
  if (choice.type !== 'function') throw unsupported('tool_choice.type', `'tool_choice' of type ${describe(choice.type)} (only 'function', or the strings 'auto', 'none', 'required')`);
  const name = isObject(choice.function) ? choice.function.name : undefined;
  if (!tools.some((t) => t.function.name === name)) {
    const names = tools.map((t) => t.function.name).join(', ');
    throw bad('tool_choice.function.name', `'tool_choice.function.name' must name one of the tools (${names.length > 200 ? `${tools.length} tools` : names}); got ${describe(name)}`);
  }
  return { tools, toolChoice: { type: 'function', function: { name } } };
}

/**
 * An assistant message's `tool_calls` (a conversation sent back with its calls). Clients send
 * the arguments as the JSON string the server gave them; templates render an object, as HF's do.
 */
export function parseAssistantToolCalls(calls, i) {
  const at = `messages[${i}].tool_calls`;
  if (!Array.isArray(calls)) throw bad(at, `'${at}' must be an array; got ${describe(calls)}`);
  return calls.map((c, j) => {
    const here = `${at}[${j}]`;
    if (!isObject(c) || !isObject(c.function)) throw bad(here, `'${here}' must be { id, type: 'function', function: { name, arguments } }; got ${describe(c)}`);
    if (given(c, 'type') && c.type !== 'function') throw unsupported(`${here}.type`, `tool calls of type ${describe(c.type)} (only 'function')`);
    const { name, arguments: args } = c.function;
    if (typeof name !== 'string' || name.length === 0) throw bad(`${here}.function.name`, `'${here}.function.name' must be a non-empty string; got ${describe(name)}`);
    let parsed = args ?? {};
    if (typeof args === 'string') {
      try {
        parsed = JSON.parse(args);
      } catch (e) {
        throw bad(`${here}.function.arguments`, `'${here}.function.arguments' must be the call's arguments as a JSON string; it is not JSON (${e.message})`);
      }
    }
    const out = { type: 'function', function: { name, arguments: parsed } };
    if (typeof c.id === 'string') out.id = c.id;
    return out;
  });
}

/**
 * What the model's chat template makes of the request's tools: those it offers the model
 * (none for tool_choice 'none'), and for a forced call the opening the prompt ends with and the
 * constraint on the rest. The same decisions engine.chat makes, taken here so that a request the
 * template cannot serve gets a 400 naming the field.
 * @param {import('@moeflash/core').ChatTemplate | null} template
 */
export function toolPlan(template, tools, toolChoice) {
  const offered = tools?.length && toolChoice !== 'none' ? tools : undefined;
  if (!offered) return { offered: undefined, forced: null };
  const format = template ? toolCallFormat(template.source({ tools: offered })) : null;
  if (!format) {
    throw bad('tools', `this model's chat template writes no tool calls the server can read (Qwen's <tool_call> blocks or gpt-oss's harmony format); leave out 'tools'`);
  }
  try {
    return { offered, forced: forcedCall(format, offered, toolChoice) };
  } catch (e) {
    // harmony names the function before its arguments, so 'required' must say which.
    throw bad('tool_choice', `'tool_choice' 'required' with several tools cannot be served by this model's tool-call format (gpt-oss harmony names the function first): name one, { type: 'function', function: { name } } (${e.message})`);
  }
}
