import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Ajv from 'ajv';
import { ChatTemplate, createEngine, parseToolCalls, ToolCallStream, toolCallFormat, type Engine, type ToolCallEvent, type ToolDefinition } from '@moeflash/core';
import { repoRoot } from './helpers.js';

const fixture = (name: string) => fs.readFileSync(path.join(repoRoot, 'packages/core/test/fixtures/chat-templates', name), 'utf8');
const weather: ToolDefinition = {
  type: 'function',
  function: { name: 'get_weather', description: 'Weather of a city', parameters: { type: 'object', properties: { city: { type: 'string', maxLength: 20 }, days: { type: 'integer', minimum: 1, maximum: 7 } }, required: ['city', 'days'] } },
};

/** Streams `text` in pieces of `size` characters and folds the events back into calls and content. */
function streamed(text: string, format: 'qwen' | 'harmony', size: number) {
  const s = new ToolCallStream(format, 'c');
  const events: ToolCallEvent[] = [];
  for (let i = 0; i < text.length; i += size) events.push(...s.push(text.slice(i, i + size)));
  events.push(...s.end());
  const calls: { name: string; args: string }[] = [];
  let content = '';
  for (const e of events) {
    if (e.type === 'content') content += e.delta;
    else if (e.type === 'tool_call_start') calls[e.index] = { name: e.name, args: '' };
    else calls[e.index]!.args += e.delta;
  }
  return { content, calls };
}

describe('tool calls in the two template families', () => {
  it('renders tools and tool turns through both templates and detects their formats', () => {
    const qwen = new ChatTemplate(fixture('qwen3.jinja'));
    const harmony = new ChatTemplate(fixture('harmony.jinja'));
    expect(toolCallFormat(qwen.source())).toBe('qwen');
    expect(toolCallFormat(harmony.source())).toBe('harmony');
    const messages = [
      { role: 'user', content: 'Weather in Paris?' },
      { role: 'assistant', content: '', tool_calls: [{ type: 'function', function: { name: 'get_weather', arguments: { city: 'Paris', days: 1 } } }] },
      { role: 'tool', name: 'get_weather', content: '{"temp": 21}' },
    ];
    const q = qwen.apply(messages, { tools: [weather] });
    expect(q).toContain('<tools>\n{"type": "function", "function": {"name": "get_weather"');
    expect(q).toContain('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call><|im_end|>');
    expect(q).toContain('<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n');
    const h = harmony.apply(messages, { tools: [weather] });
    expect(h).toContain('namespace functions {');
    expect(h).toContain('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 1}<|call|>');
    expect(h).toContain('<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"{\\"temp\\": 21}"<|end|><|start|>assistant');
  });

  it('parses Qwen replies, whole and streamed in any piece size, into the same calls', () => {
    const text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>';
    const r = parseToolCalls(text, 'qwen', 'c');
    expect(r.content).toBe('Let me look.');
    expect(r.toolCalls).toEqual([
      { id: 'c_0', name: 'get_weather', arguments: { city: 'Paris', days: 2 }, argumentsText: '{"city": "Paris", "days": 2}' },
      { id: 'c_1', name: 'get_time', arguments: {}, argumentsText: '{}' },
    ]);
    for (const size of [1, 2, 5, 13, 1000]) {
      const s = streamed(text, 'qwen', size);
      expect(s.calls.map((c) => [c.name, JSON.parse(c.args)])).toEqual([['get_weather', { city: 'Paris', days: 2 }], ['get_time', {}]]);
      expect(s.content.trim()).toBe('Let me look.');
    }
    expect(parseToolCalls('just text', 'qwen').toolCalls).toEqual([]);
  });

  it('parses harmony replies: analysis as reasoning, commentary to=functions.* as calls, final as content', () => {
    const text = '<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo", "days": 3}';
    const r = parseToolCalls(text, 'harmony', 'c');
    expect(r.reasoning).toBe('Need weather.');
    expect(r.toolCalls).toEqual([{ id: 'c_0', name: 'get_weather', arguments: { city: 'Oslo', days: 3 }, argumentsText: '{"city": "Oslo", "days": 3}' }]);
    for (const size of [1, 3, 7, 1000]) {
      const s = streamed(text, 'harmony', size);
      expect(s.calls.map((c) => [c.name, JSON.parse(c.args)])).toEqual([['get_weather', { city: 'Oslo', days: 3 }]]);
    }
    expect(parseToolCalls('<|channel|>final<|message|>It is sunny.<|return|>', 'harmony').content).toBe('It is sunny.');
  });
});

describe('chat({ tools, toolChoice }) on the bundled model', () => {
  let engine: Engine;
  let harmonyDir: string;
  let harmony: Engine;
  beforeAll(async () => {
    engine = await createEngine({ model: path.join(repoRoot, 'models/moeflash-tiny-coder'), backend: 'cpu', log: () => {} });
    // The same weights with the harmony template: only the prompt format and the parser change.
    harmonyDir = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-harmony-'));
    for (const f of fs.readdirSync(path.join(repoRoot, 'models/moeflash-tiny-coder'))) fs.copyFileSync(path.join(repoRoot, 'models/moeflash-tiny-coder', f), path.join(harmonyDir, f));
    fs.writeFileSync(path.join(harmonyDir, 'chat_template.jinja'), fixture('harmony.jinja'));
    harmony = await createEngine({ model: harmonyDir, backend: 'cpu', log: () => {} });
  });
  afterAll(async () => {
    await engine.close();
    await harmony.close();
    fs.rmSync(harmonyDir, { recursive: true, force: true });
  });

  it('toolChoice required / named: the reply is a call whose arguments validate against the tool schema', async () => {
    const ajv = new Ajv({ strict: false });
    const time: ToolDefinition = { type: 'function', function: { name: 'get_time', parameters: { type: 'object', properties: { zone: { enum: ['UTC', 'CET'] } }, required: ['zone'] } } };
    for (const [e, toolChoice] of [[engine, 'required'], [engine, { type: 'function', function: { name: 'get_time' } }], [harmony, { type: 'function', function: { name: 'get_weather' } }]] as const) {
      for (const seed of [1, 2]) {
        const stream = e.chat([{ role: 'user', content: 'Weather in Paris?' }], { tools: [weather, time], toolChoice, maxTokens: 64, seed });
        const events: ToolCallEvent[] = [];
        for await (const c of stream) events.push(...c.events);
        const r = await stream.result;
        expect(r.finishReason).toBe('stop');
        expect(r.toolCalls).toHaveLength(1);
        const call = r.toolCalls[0]!;
        const tool = [weather, time].find((t) => t.function.name === call.name)!;
        if (typeof toolChoice === 'object') expect(call.name).toBe(toolChoice.function.name);
        expect(ajv.validate(tool.function.parameters!, call.arguments)).toBe(true);
        // The stream told the same call.
        expect(events.find((ev) => ev.type === 'tool_call_start')).toMatchObject({ name: call.name, id: call.id });
        const args = events.filter((ev) => ev.type === 'tool_call_arguments').map((ev) => (ev as { delta: string }).delta).join('');
        expect(JSON.parse(args)).toEqual(call.arguments);
      }
    }
  });

  it('tool results go back as messages; toolChoice none offers no tools', async () => {
    const r = await engine.chat(
      [
        { role: 'user', content: 'Weather in Paris?' },
        { role: 'assistant', content: '', tool_calls: [{ type: 'function', function: { name: 'get_weather', arguments: { city: 'Paris', days: 1 } } }] },
        { role: 'tool', content: '{"temp": 21}' },
      ],
      { tools: [weather], maxTokens: 8, temperature: 0 },
    ).result;
    expect(r.promptTokens).toBeGreaterThan(engine.tokenizer.encode('{"temp": 21}').length);
    const none = await engine.chat([{ role: 'user', content: 'hi' }], { tools: [weather], toolChoice: 'none', maxTokens: 4, temperature: 0 }).result;
    expect(none.toolCalls).toEqual([]);
    expect(() => engine.chat([{ role: 'user', content: 'x' }], { tools: [weather], toolChoice: { type: 'function', function: { name: 'nope' } } })).toThrow(/naming one of the tools/);
  });
});
