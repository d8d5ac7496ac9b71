import type { ChatMessage, Engine, FinishReason, ToolChoice } from '@moeflash/core';
import type { AgentTool } from './tools.mjs';

/** What a tool call gave: the model reads it as the tool message's content (JSON). */
export type ToolOutcome = { ok: true; result: unknown } | { ok: false; error: string };

export interface AgentCall {
  id: string;
  name: string;
  arguments: unknown;
  argumentsText: string;
  outcome: ToolOutcome;
}

export interface AgentStep {
  step: number;
  toolChoice: ToolChoice;
  content: string;
  reasoning: string;
  finishReason: FinishReason;
  promptTokens: number;
  calls: AgentCall[];
}

export type AgentEvent =
  | { type: 'step'; step: number; toolChoice: ToolChoice }
  | { type: 'content'; step: number; delta: string }
  | { type: 'reasoning'; step: number; text: string }
  | { type: 'tool_call'; step: number; id: string; name: string }
  | { type: 'tool_call_arguments'; step: number; index: number; delta: string }
  | { type: 'tool_result'; step: number; id: string; name: string; outcome: ToolOutcome }
  | { type: 'answer'; step: number; answer: string }
  | { type: 'limit'; step: number };

export interface AgentOptions {
  engine: Engine;
  task: string;
  tools: AgentTool[];
  /** System message (default DEFAULT_SYSTEM; '' for none). */
  system?: string;
  /** Most model calls (default 6). */
  maxSteps?: number;
  /** chat()'s toolChoice for every step, or a function of the step (1-based) and the conversation so far. Default 'auto'. */
  toolChoice?: ToolChoice | ((step: number, messages: readonly ChatMessage[]) => ToolChoice);
  /** Step k samples with seed + k - 1 (default 1). */
  seed?: number;
  temperature?: number;
  /** Tokens a model call may write (default 96). */
  maxTokens?: number;
  signal?: AbortSignal;
  /** Called as the loop goes: streamed content and call arguments, results, the end. */
  onEvent?: (e: AgentEvent) => void;
}

export interface AgentResult {
  /** The final tool's result or the last reply's content; null when the step limit came first. */
  answer: string | null;
  stopReason: 'answer' | 'max_steps';
  steps: AgentStep[];
  /** The conversation as the model saw it, with the calls and tool messages appended. */
  messages: ChatMessage[];
}

export const DEFAULT_SYSTEM: string;
export function runAgent(opts: AgentOptions): Promise<AgentResult>;
/** A toolChoice policy forcing each non-final tool by name in turn, then the final tool(s). */
export function eachToolInTurn(tools: readonly AgentTool[]): (step: number) => ToolChoice;
