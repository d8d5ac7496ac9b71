/**
 * The agent loop end to end on the bundled model (CPU backend, fixed seeds). The tiny model writes
 * Python, not plans, so the test forces the calls (toolChoice) and asserts the mechanics: calls
 * with arguments valid under each tool's schema, their results reaching the model as tool
 * messages, tool errors coming back as error results, the HTTP tool talking to a server started
 * here, and the loop ending on an answer or at its step limit.
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import Ajv from 'ajv';
import { ChatTemplate, createEngine, type ChatMessage, type Engine } from '@moeflash/core';
import { repoRoot } from '../../../packages/core/test/helpers.js';
import { eachToolInTurn, runAgent, type AgentEvent, type AgentOptions, type AgentResult } from '../src/agent.mjs';
import { calculatorTool, finalAnswerTool, httpGetTool, listFiles, readFileTool, type AgentTool } from '../src/tools.mjs';

const MODEL = path.join(repoRoot, 'models', 'moeflash-tiny-coder');
const ajv = new Ajv({ strict: false });
const NOTES = 'The stock is on /inventory: sum price * count.\n';
const SECRET = 'the secret outside the folder';
const ROUTES: Record<string, unknown> = { '/inventory': { items: [{ name: 'bolt', price: 0.25, count: 120 }] }, '/status': { ok: true } };

describe('examples/agent on the bundled model (CPU)', () => {
  let engine: Engine;
  let template: ChatTemplate;
  let dir: string;
  let root: string;
  let server: http.Server;
  let baseUrl: string;
  const served: string[] = [];

  beforeAll(async () => {
    engine = await createEngine({ model: MODEL, backend: 'cpu', log: () => {} });
    template = (await ChatTemplate.load(MODEL))!;
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-agent-'));
    root = path.join(dir, 'workspace');
    fs.mkdirSync(root);
    fs.writeFileSync(path.join(root, 'notes.txt'), NOTES);
    fs.writeFileSync(path.join(dir, 'outside.txt'), SECRET);
    server = http.createServer((req, res) => {
      served.push(`${req.method} ${req.url}`);
      const body = ROUTES[req.url ?? ''];
      res.writeHead(body ? 200 : 404, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body ?? { error: 'no such route' }));
    });
    await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
    baseUrl = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  });
  afterAll(async () => {
    await engine?.close();
    await new Promise((done) => server?.close(done));
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Runs the loop on the engine, recording the messages of every chat() call and every event. */
  async function run(opts: Omit<AgentOptions, 'engine' | 'onEvent'>) {
    const prompts: ChatMessage[][] = [];
    const spy = { chat: (m: ChatMessage[], o: object) => (prompts.push(structuredClone(m)), engine.chat(m, o)) } as unknown as Engine;
    const events: AgentEvent[] = [];
    const result = await runAgent({ ...opts, engine: spy, onEvent: (e) => events.push(e) });
    return { result, prompts, events };
  }

  /** Each call of each step: valid arguments, streamed as they were parsed, its outcome in the next prompt as a tool message. */
  function checkMechanics(tools: AgentTool[], { result, prompts, events }: Awaited<ReturnType<typeof run>>) {
    const defs = tools.map((t) => ({ type: 'function', function: { name: t.name, description: t.description, parameters: t.parameters } }));
    expect(prompts).toHaveLength(result.steps.length);
    result.steps.forEach((s, k) => {
      const streamed = events.filter((e): e is Extract<AgentEvent, { type: 'tool_call_arguments' }> => e.type === 'tool_call_arguments' && e.step === s.step);
      expect(streamed.map((e) => e.delta).join('')).toBe(s.calls.map((c) => c.argumentsText).join(''));
      for (const c of s.calls) {
        const tool = tools.find((t) => t.name === c.name)!;
        expect(tool, c.name).toBeDefined();
        expect(ajv.validate(tool.parameters, c.arguments), `${c.name} ${c.argumentsText}: ${ajv.errorsText()}`).toBe(true);
        expect(events).toContainEqual({ type: 'tool_result', step: s.step, id: c.id, name: c.name, outcome: c.outcome });
        if (tool.final && c.outcome.ok) continue;
        // The next model call sees the call and its result ...
        const next = prompts[k + 1];
        if (!next) continue;
        const at = next.findIndex((m) => m.role === 'assistant' && (m.tool_calls as Array<{ id: string }>)?.some((tc) => tc.id === c.id));
        expect(at, `step ${s.step + 1} sees call ${c.id}`).toBeGreaterThan(0);
        const reply = next.find((m) => m.role === 'tool' && m.tool_call_id === c.id)!;
        expect(JSON.parse(reply.content as string)).toEqual(c.outcome);
        // ... rendered by the model's own template as a tool response in its prompt, after the call.
        const prompt = template.apply(next, { tools: defs });
        expect(prompt).toContain(`<tool_response>\n${reply.content}\n</tool_response>`);
        expect(prompt.indexOf(`{"name": "${c.name}", "arguments": ${c.argumentsText}}`)).toBeLessThan(prompt.indexOf(reply.content as string));
      }
      if (k > 0) expect(s.promptTokens).toBeGreaterThan(result.steps[k - 1]!.promptTokens);
    });
  }

  it('each tool in turn: schema-valid calls, results fed back as tool messages, ends with final_answer within the limit, reproducibly', async () => {
    const tools = [readFileTool({ root, choices: await listFiles(root) }), httpGetTool({ baseUrl, routes: Object.keys(ROUTES) }), calculatorTool(), finalAnswerTool()];
    served.length = 0;
    const r = await run({ task: 'Read notes.txt, get the inventory, compute its value.', tools, toolChoice: eachToolInTurn(tools), maxSteps: 6, seed: 1 });
    checkMechanics(tools, r);
    const { result } = r;
    expect(result.stopReason).toBe('answer');
    expect(result.steps.map((s) => s.calls.map((c) => c.name))).toEqual([['read_file'], ['http_get'], ['calculator'], ['final_answer']]);
    const [read, get, calc, final] = result.steps.map((s) => s.calls[0]!);
    expect(read!.outcome).toEqual({ ok: true, result: { path: 'notes.txt', bytes: NOTES.length, text: NOTES, truncated: false } });
    // The HTTP tool asked the server started here for the path the model chose, and returned its body.
    const route = (get!.arguments as { path: string }).path;
    expect(served).toEqual([`GET ${route}`]);
    expect(get!.outcome).toMatchObject({ ok: true, result: { status: 200, body: JSON.stringify(ROUTES[route]) } });
    // The calculator's result is a value or an error message the model reads; either way no throw.
    expect(calc!.outcome.ok ? typeof (calc!.outcome.result as { value: number }).value : typeof (calc!.outcome as { error: string }).error).toMatch(/number|string/);
    expect(final!.outcome.ok).toBe(true);
    expect(result.answer).toBe((final!.arguments as { answer: string }).answer);
    expect(r.events.at(-1)).toEqual({ type: 'answer', step: 4, answer: result.answer });

    // The same seed gives the same run.
    const again = await run({ task: 'Read notes.txt, get the inventory, compute its value.', tools, toolChoice: eachToolInTurn(tools), maxSteps: 6, seed: 1 });
    expect(again.result.steps.map((s) => s.calls.map((c) => c.argumentsText))).toEqual(result.steps.map((s) => s.calls.map((c) => c.argumentsText)));
  });

  it('tool errors (a file outside the folder, a thrown exception) come back to the model as error results; the loop goes on', async () => {
    // The enum makes the tiny model ask for a path that leaves the folder.
    const explode: AgentTool = {
      name: 'explode',
      parameters: { type: 'object', properties: { n: { type: 'integer', minimum: 0, maximum: 9 } }, required: ['n'] },
      async run() {
        throw new TypeError('boom');
      },
    };
    const tools = [readFileTool({ root, choices: ['../outside.txt'] }), explode, finalAnswerTool()];
    const r = await run({ task: 'Read ../outside.txt.', tools, toolChoice: eachToolInTurn(tools), maxSteps: 5, seed: 3 });
    checkMechanics(tools, r);
    const { result } = r;
    expect(result.steps.map((s) => s.calls.map((c) => c.name))).toEqual([['read_file'], ['explode'], ['final_answer']]);
    expect(result.steps[0]!.calls[0]!.outcome).toEqual({ ok: false, error: '"../outside.txt" is outside the workspace folder; only files inside it can be read' });
    expect(result.steps[1]!.calls[0]!.outcome).toEqual({ ok: false, error: 'boom' });
    expect(result.stopReason).toBe('answer');
    expect(JSON.stringify(result.messages)).not.toContain(SECRET);
  });

  it('the step limit ends the loop when no answer comes (toolChoice required, no final tool offered)', async () => {
    const tools = [readFileTool({ root }), calculatorTool()];
    const r = await run({ task: 'Compute 2 + 3.', tools, toolChoice: 'required', maxSteps: 3, seed: 5 });
    checkMechanics(tools, r);
    expect(r.result.stopReason).toBe('max_steps');
    expect(r.result.answer).toBeNull();
    expect(r.result.steps).toHaveLength(3);
    for (const s of r.result.steps) expect(s.calls).toHaveLength(1);
    expect(r.events.at(-1)).toEqual({ type: 'limit', step: 3 });
  });

  it("toolChoice auto: the tiny model calls nothing; its streamed reply is the answer", async () => {
    const tools = [readFileTool({ root }), calculatorTool(), finalAnswerTool()];
    const r = await run({ task: 'What is 2 + 3?', tools, toolChoice: 'auto', maxSteps: 4, seed: 2, maxTokens: 32 });
    expect(r.result.stopReason).toBe('answer');
    expect(r.result.steps).toHaveLength(1);
    const streamed = r.events.filter((e) => e.type === 'content').map((e) => (e as { delta: string }).delta).join('');
    expect(streamed.trim()).toBe(r.result.answer);
    expect(r.result.answer!.length).toBeGreaterThan(0);
  });
});

describe('the loop with a scripted engine (replies the tiny model does not write)', () => {
  /** An engine whose chat() replies with the given tool calls, one reply a step. */
  function scripted(replies: Array<Array<{ name: string; argumentsText: string }>>): Engine {
    let n = 0;
    return {
      chat() {
        const calls = (replies[n++] ?? []).map((c, i) => {
          let args: unknown = null;
          try {
            args = JSON.parse(c.argumentsText);
          } catch {}
          return { id: `call_${n}_${i}`, name: c.name, arguments: args, argumentsText: c.argumentsText };
        });
        const result = Promise.resolve({ content: '', reasoning: '', toolCalls: calls, finishReason: 'stop', promptTokens: 10 * n });
        return { result, async *[Symbol.asyncIterator]() {} };
      },
    } as unknown as Engine;
  }

  it('unknown tools, arguments that are not JSON objects and a failed final answer are error results, in order, and the loop goes on', async () => {
    const engine = scripted([
      [{ name: 'rm_rf', argumentsText: '{}' }, { name: 'calculator', argumentsText: '{"expression": "1 +' }],
      [{ name: 'calculator', argumentsText: '[1]' }, { name: 'final_answer', argumentsText: '{"answer": 4}' }],
      [{ name: 'calculator', argumentsText: '{"expression": "2^10"}' }, { name: 'final_answer', argumentsText: '{"answer": "1024"}' }],
    ]);
    const result: AgentResult = await runAgent({ engine, task: 't', tools: [calculatorTool(), finalAnswerTool()], maxSteps: 5 });
    expect(result.steps.flatMap((s) => s.calls.map((c) => c.outcome))).toEqual([
      { ok: false, error: 'no tool named "rm_rf"; tools: calculator, final_answer' },
      { ok: false, error: 'the arguments must be a JSON object; got "{\\"expression\\": \\"1 +"' },
      { ok: false, error: 'the arguments must be a JSON object; got "[1]"' },
      { ok: false, error: '"answer" must be a string; got 4' },
      { ok: true, result: { expression: '2^10', value: 1024 } },
      { ok: true, result: '1024' },
    ]);
    expect(result).toMatchObject({ answer: '1024', stopReason: 'answer' });
    // Every failed call got its tool message, in the order of the calls.
    const toolMessages = result.messages.filter((m) => m.role === 'tool').map((m) => m.tool_call_id);
    expect(toolMessages).toEqual(['call_1_0', 'call_1_1', 'call_2_0', 'call_2_1', 'call_3_0']);
  });
});
