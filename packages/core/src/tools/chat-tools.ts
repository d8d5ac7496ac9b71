/**
 * `chat(messages, { tools, toolChoice })`: the tools go to the model's own chat template; its
 * reply is read for tool calls in the template's format (tool-calls.ts). With toolChoice
 * 'required' or a named function the reply must be a call: the template's call opening is put at
 * the end of the prompt and the rest is constrained to JSON under the tool's parameter schema.
 */
import { MoeflashError } from '../errors.js';
import type { ResponseFormat } from '../grammar/response-format.js';
import { parseToolCalls, ToolCallStream, type ToolCall, type ToolCallEvent, type ToolCallFormat } from './tool-calls.js';

/** A tool as OpenAI's API describes it. */
export interface ToolDefinition {
  type: 'function';
  function: { name: string; description?: string; parameters?: Record<string, unknown> };
}

export type ToolChoice = 'auto' | 'none' | 'required' | { type: 'function'; function: { name: string } };

export interface ForcedCall {
  /** Appended to the rendered prompt: the format's opening of a call. */
  prefix: string;
  responseFormat: ResponseFormat;
}

const ANY_OBJECT = { type: 'object' };

export function validateTools(tools: unknown, toolChoice: unknown): void {
  if (tools === undefined) return;
  if (!Array.isArray(tools)) throw new MoeflashError('INVALID_ARGUMENT', 'tools must be an array of { type: "function", function: { name, parameters } }');
  tools.forEach((t: ToolDefinition, i) => {
    if (t?.type !== 'function' || typeof t.function?.name !== 'string' || !/^[\w.-]+$/.test(t.function.name)) {
      throw new MoeflashError('INVALID_ARGUMENT', `tools[${i}] must be { type: "function", function: { name, parameters } } with a name of letters, digits, _ . -`);
    }
  });
  if (toolChoice !== undefined && !['auto', 'none', 'required'].includes(toolChoice as string)) {
    const name = (toolChoice as { function?: { name?: unknown } })?.function?.name;
    if (!tools.some((t: ToolDefinition) => t.function.name === name)) {
      throw new MoeflashError('INVALID_ARGUMENT', `toolChoice must be "auto", "none", "required" or { type: "function", function: { name } } naming one of the tools; got ${JSON.stringify(toolChoice)}`);
    }
  }
}

/** The prompt suffix and output constraint that make the reply a call, or null for 'auto'/'none'. */
export function forcedCall(format: ToolCallFormat, tools: ToolDefinition[], toolChoice: ToolChoice | undefined): ForcedCall | null {
  if (toolChoice === undefined || toolChoice === 'auto' || toolChoice === 'none') return null;
  const chosen = toolChoice === 'required' ? tools : tools.filter((t) => t.function.name === toolChoice.function.name);
  if (format === 'qwen') {
    const calls = chosen.map((t) => ({
      type: 'object',
      properties: { name: { const: t.function.name }, arguments: t.function.parameters ?? ANY_OBJECT },
      required: ['name', 'arguments'],
    }));
    return { prefix: '<tool_call>\n', responseFormat: { type: 'json_schema', schema: calls.length === 1 ? calls[0]! : { anyOf: calls } } };
  }
  if (chosen.length !== 1) {
    throw new MoeflashError('INVALID_ARGUMENT', 'toolChoice "required" with several tools needs the tool name in the prompt for this model\'s format (harmony): name the function, { type: "function", function: { name } }');
  }
  const t = chosen[0]!;
  return {
    prefix: `<|channel|>commentary to=functions.${t.function.name} <|constrain|>json<|message|>`,
    responseFormat: { type: 'json_schema', schema: t.function.parameters ?? ANY_OBJECT },
  };
}

/** The reply of a chat request, read for tool calls. */
export interface ChatReply {
  content: string;
  /** harmony's analysis channel; empty for other formats. */
  reasoning: string;
  toolCalls: ToolCall[];
}

export { parseToolCalls, ToolCallStream, type ToolCall, type ToolCallEvent, type ToolCallFormat };
