// Engine results in the shapes OpenAI's API answers with: tool calls, finish reasons, chat
// logprobs (`choices[].logprobs.content[]`), the legacy logprobs of text completions, and the
// deltas of streamed chat chunks.

/**
 * `message.tool_calls`: the arguments as the model wrote them (a JSON string, as OpenAI sends
 * them; under a forced call they follow the tool's schema).
 * @param {import('@moeflash/core').ToolCall[]} calls
 */
export const toolCallsOf = (calls) => calls.map((c) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.argumentsText } }));

/** 'length' when the token budget ran out; 'tool_calls' when the reply holds calls; else 'stop'. */
export function finishReasonOf(r, toolCalls = []) {
  if (r.finishReason === 'length') return 'length';
  return toolCalls.length ? 'tool_calls' : 'stop';
}

const entry = (t) => ({ token: t.text, logprob: t.logprob, bytes: t.bytes });

/**
 * `choices[].logprobs` of a chat completion (or of one chunk): every generated token, tool-call
 * text included, with its top alternatives most likely first.
 * @param {import('@moeflash/core').TokenLogprob[] | undefined} lps
 */
export function chatLogprobsOf(lps) {
  if (!lps) return null;
  return { content: lps.map((t) => ({ ...entry(t), top_logprobs: t.top.map(entry) })), refusal: null };
}

/**
 * The legacy `logprobs` of /v1/completions: parallel arrays, alternatives as { text: logprob }
 * with the chosen token always among them (OpenAI's rule), and each token's offset in the
 * completion's text.
 * @param {import('@moeflash/core').TokenLogprob[]} lps
 * @param {number[]} offsets
 */
export function completionLogprobsOf(lps, offsets) {
  return {
    tokens: lps.map((t) => t.text),
    token_logprobs: lps.map((t) => t.logprob),
    top_logprobs: lps.map((t) => {
      const top = Object.fromEntries(t.top.map((a) => [a.text, a.logprob]));
      if (!(t.text in top)) top[t.text] = t.logprob;
      return top;
    }),
    text_offset: offsets,
  };
}

/**
 * Where each token of a chunk begins in the completion's text: the text streamed before the
 * chunk, then the chunk's own tokens one after another (text the stop-string filter or a split
 * character holds back arrives in a later chunk, so offsets stay within what was sent).
 * @param {number} start length of the text before this chunk
 * @param {{ text: string, logprobs?: import('@moeflash/core').TokenLogprob[] }} chunk
 */
export function tokenOffsets(start, chunk) {
  const end = start + chunk.text.length;
  let at = start;
  return (chunk.logprobs ?? []).map((t) => {
    const here = Math.min(at, end);
    at += t.text.length;
    return here;
  });
}

/**
 * The `delta` of a streamed chat chunk, from the content and tool-call events of one engine
 * chunk. A call opens with its id, type and name; its arguments follow in pieces, as OpenAI
 * streams them (consecutive pieces of one call are merged into one entry).
 * @param {import('@moeflash/core').ToolCallEvent[]} events
 */
export function deltaOf(events) {
  const delta = {};
  for (const e of events) {
    if (e.type === 'content') {
      delta.content = (delta.content ?? '') + e.delta;
      continue;
    }
    delta.tool_calls ??= [];
    const last = delta.tool_calls.at(-1);
    if (e.type === 'tool_call_start') {
      delta.tool_calls.push({ index: e.index, id: e.id, type: 'function', function: { name: e.name, arguments: '' } });
    } else if (last && last.index === e.index) {
      last.function.arguments += e.delta;
    } else {
      delta.tool_calls.push({ index: e.index, function: { arguments: e.delta } });
    }
  }
  return delta;
}
