/**
 * A chat reply as it streams: each chunk of `generate()` plus the content and tool-call events
 * its text made final, and a result with the reply parsed into content and tool calls.
 */
import type { GenerateChunk, GenerateResult, GenerateStream } from '../engine/engine.js';
import { parseToolCalls, ToolCallStream, type ToolCallEvent, type ToolCallFormat } from './tool-calls.js';
import type { ChatReply } from './chat-tools.js';

export interface ChatChunk extends GenerateChunk {
  /** Content and tool-call deltas that became final with this chunk (the last chunk may carry only events). */
  events: ToolCallEvent[];
}

export interface ChatResult extends GenerateResult, ChatReply {}

export interface ChatStream extends AsyncIterable<ChatChunk> {
  readonly result: Promise<ChatResult>;
}

/**
 * Wraps a generate stream. `prefix` is reply text that the prompt already holds (a forced call's
 * opening); `format` null reads the whole reply as content.
 */
export function chatStream(inner: GenerateStream, format: ToolCallFormat | null, prefix: string): ChatStream {
  const ids = `call_${Math.random().toString(36).slice(2, 10)}`;
  const result = inner.result.then((r): ChatResult => {
    if (!format) return { ...r, content: r.text, reasoning: '', toolCalls: [] };
    return { ...r, ...parseToolCalls(prefix + r.text, format, ids) };
  });
  result.catch(() => {});
  return {
    result,
    async *[Symbol.asyncIterator]() {
      const reader = format ? new ToolCallStream(format, ids) : null;
      // The prefix can already open a call (harmony's header names the function): its events go
      // with the first chunk.
      let pending = reader?.push(prefix) ?? [];
      for await (const chunk of inner) {
        const events: ToolCallEvent[] = reader ? [...pending, ...reader.push(chunk.text)] : chunk.text ? [{ type: 'content', delta: chunk.text }] : [];
        pending = [];
        yield { ...chunk, events };
      }
      const rest = [...pending, ...(reader?.end() ?? [])];
      if (rest.length) yield { text: '', tokens: [], events: rest };
    },
  };
}
