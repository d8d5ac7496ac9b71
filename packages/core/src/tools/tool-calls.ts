/**
 * Tool calls in a model's output text, in the two wire formats of the families moeflash runs:
 *
 *   qwen     (Qwen3, Hermes-style templates):  text <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>
 *   harmony  (gpt-oss):  <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>commentary
 *            to=functions.f <|constrain|>json<|message|>{...}   (the <|call|> stop token ends the text)
 *
 * `parseToolCalls` reads a whole reply; `ToolCallStream` reads it as it streams and reports the
 * growth of the content and of each call (start with its name, argument deltas), by parsing the
 * text so far again at each delta and holding back what a marker could still turn into.
 */
export type ToolCallFormat = 'qwen' | 'harmony';

export interface ToolCall {
  /** Unique within the reply: `call_{index}` plus a request-specific prefix when given. */
  id: string;
  name: string;
  /** The arguments as the model wrote them, parsed (null when they are not JSON: see argumentsText). */
  arguments: unknown;
  argumentsText: string;
}

export interface ParsedReply {
  /** Text meant for the user (outside tool-call blocks; harmony: the final and commentary channels). */
  content: string;
  /** harmony's analysis channel. */
  reasoning: string;
  toolCalls: ToolCall[];
}

export type ToolCallEvent =
  | { type: 'content'; delta: string }
  | { type: 'tool_call_start'; index: number; id: string; name: string }
  | { type: 'tool_call_arguments'; index: number; delta: string };

/** The format a chat template writes tool calls in, from its source; null when it writes none. */
export function toolCallFormat(templateSource: string): ToolCallFormat | null {
  if (templateSource.includes('<|channel|>') && templateSource.includes('to=functions.')) return 'harmony';
  if (templateSource.includes('<tool_call>')) return 'qwen';
  return null;
}

interface PartialCall {
  name: string;
  argumentsText: string;
  done: boolean;
}

interface PartialReply {
  content: string;
  reasoning: string;
  calls: PartialCall[];
}

const QWEN_OPEN = '<tool_call>';
const QWEN_CLOSE = '</tool_call>';
const QWEN_HEAD = /^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*/;

/** Length of the longest suffix of `text` that is a proper prefix of `marker` (what to hold back). */
function partialMarker(text: string, marker: string): number {
  for (let n = Math.min(marker.length - 1, text.length); n > 0; n--) if (marker.startsWith(text.slice(-n))) return n;
  return 0;
}

function parseQwen(text: string, final: boolean): PartialReply {
  const out: PartialReply = { content: '', reasoning: '', calls: [] };
  let at = 0;
  for (;;) {
    const open = text.indexOf(QWEN_OPEN, at);
    if (open < 0) {
      const rest = text.slice(at);
      out.content += final ? rest : rest.slice(0, rest.length - partialMarker(rest, QWEN_OPEN));
      break;
    }
    out.content += text.slice(at, open);
    const bodyStart = open + QWEN_OPEN.length;
    const close = text.indexOf(QWEN_CLOSE, bodyStart);
    const body = text.slice(bodyStart, close < 0 ? text.length : close);
    const head = QWEN_HEAD.exec(body);
    if (head) {
      let args = body.slice(head[0].length);
      const done = close >= 0 || final;
      // The call object's own closing brace follows the arguments: hold it back until the end.
      if (done) args = args.replace(/\s*\}\s*$/, '');
      else args = args.slice(0, args.length - partialMarker(args, '}\n' + QWEN_CLOSE));
      out.calls.push({ name: JSON.parse(`"${head[1]}"`) as string, argumentsText: args, done });
    }
    if (close < 0) break;
    at = close + QWEN_CLOSE.length;
  }
  return out;
}

const HARMONY_MESSAGE = /(?:<\|start\|>assistant)?<\|channel\|>(\w+)(?:\s+to=functions\.([^\s<]+))?\s*(?:<\|constrain\|>\w+)?<\|message\|>/g;
const HARMONY_END = /<\|end\|>|<\|call\|>|<\|return\|>|<\|start\|>/;

function parseHarmony(text: string, final: boolean): PartialReply {
  const out: PartialReply = { content: '', reasoning: '', calls: [] };
  const heads = [...text.matchAll(HARMONY_MESSAGE)];
  heads.forEach((m, i) => {
    const start = m.index! + m[0].length;
    const limit = i + 1 < heads.length ? heads[i + 1]!.index! : text.length;
    let body = text.slice(start, limit);
    const end = HARMONY_END.exec(body);
    const done = end !== null || i + 1 < heads.length || final;
    if (end) body = body.slice(0, end.index);
    else if (!done) body = body.slice(0, body.length - partialMarker(body, '<|'));
    const [channel, recipient] = [m[1]!, m[2]];
    if (recipient) out.calls.push({ name: recipient, argumentsText: body, done });
    else if (channel === 'analysis') out.reasoning += body;
    else out.content += body;
  });
  // Text before any header (a template that opens the channel itself) is content.
  if (heads.length === 0) out.content = final ? text : text.slice(0, text.length - partialMarker(text, '<|'));
  return out;
}

function parse(format: ToolCallFormat, text: string, final: boolean): PartialReply {
  return format === 'qwen' ? parseQwen(text, final) : parseHarmony(text, final);
}

function parseArguments(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/** Content, reasoning and tool calls of a whole reply. */
export function parseToolCalls(text: string, format: ToolCallFormat, idPrefix = 'call'): ParsedReply {
  const p = parse(format, text, true);
  return {
    content: p.content.trim(),
    reasoning: p.reasoning.trim(),
    toolCalls: p.calls.map((c, i) => ({ id: `${idPrefix}_${i}`, name: c.name, arguments: parseArguments(c.argumentsText.trim()), argumentsText: c.argumentsText.trim() })),
  };
}

/** Streams a reply's content and tool-call deltas (see the file comment). */
export class ToolCallStream {
  private text = '';
  private content = 0;
  private readonly calls: { started: boolean; args: number }[] = [];

  constructor(
    private readonly format: ToolCallFormat,
    private readonly idPrefix = 'call',
  ) {}

  /** Adds a text delta; returns what became final. */
  push(delta: string): ToolCallEvent[] {
    this.text += delta;
    return this.diff(parse(this.format, this.text, false));
  }

  /** The reply ended: everything held back is final now. */
  end(): ToolCallEvent[] {
    return this.diff(parse(this.format, this.text, true));
  }

  private diff(p: PartialReply): ToolCallEvent[] {
    const events: ToolCallEvent[] = [];
    if (p.content.length > this.content) {
      events.push({ type: 'content', delta: p.content.slice(this.content) });
      this.content = p.content.length;
    }
    p.calls.forEach((c, index) => {
      const seen = (this.calls[index] ??= { started: false, args: 0 });
      if (!seen.started) {
        seen.started = true;
        events.push({ type: 'tool_call_start', index, id: `${this.idPrefix}_${index}`, name: c.name });
      }
      if (c.argumentsText.length > seen.args) {
        events.push({ type: 'tool_call_arguments', index, delta: c.argumentsText.slice(seen.args) });
        seen.args = c.argumentsText.length;
      }
    });
    return events;
  }
}
