// The agent loop: ask the model (chat with tools), run the tool calls it makes, append the calls
// and their results to the conversation as an assistant message and tool messages, and go again,
// until the model answers (a final_answer call, or a reply without calls) or the step limit.
//
//   messages ──chat(messages, { tools, toolChoice })──> reply (streamed: content, call deltas)
//      ^                                                  │ no calls / final_answer: done
//      └── + assistant { tool_calls } + tool { content } <┘ calls: run each tool
//
// Whatever a tool does wrong (bad arguments, a path outside its folder, a failed fetch, a thrown
// exception) becomes an error result the model reads; only the engine's own failures end the loop.

/** The ToolDefinition that chat() takes, from an agent tool. */
function definition(tool) {
  return { type: 'function', function: { name: tool.name, description: tool.description, parameters: tool.parameters } };
}

/** The toolChoice of a step: a fixed value, or what the policy function says. */
function choiceOf(policy, step, messages) {
  return typeof policy === 'function' ? policy(step, messages) : policy;
}

/**
 * A toolChoice policy that forces each tool by name in turn, then the final tool (the schedule
 * that makes a model too small to choose exercise every tool).
 */
export function eachToolInTurn(tools) {
  const order = [...tools.filter((t) => !t.final), ...tools.filter((t) => t.final)].map((t) => t.name);
  return (step) => ({ type: 'function', function: { name: order[Math.min(step - 1, order.length - 1)] } });
}

/** Runs one call; never throws: a failure is { ok: false, error }. */
async function runCall(tools, call) {
  const tool = tools.find((t) => t.name === call.name);
  if (!tool) return { ok: false, error: `no tool named "${call.name}"; tools: ${tools.map((t) => t.name).join(', ')}` };
  if (call.arguments === null || typeof call.arguments !== 'object' || Array.isArray(call.arguments)) {
    return { ok: false, error: `the arguments must be a JSON object; got ${JSON.stringify(call.argumentsText)}` };
  }
  try {
    return { ok: true, result: await tool.run(call.arguments) };
  } catch (e) {
    return { ok: false, error: e instanceof Error ? e.message : String(e) };
  }
}

export const DEFAULT_SYSTEM =
  'You are an agent. Solve the task with the tools: call one, read its result, and call the next. ' +
  'When you know the answer, call final_answer with it.';

/** See agent.d.mts. */
export async function runAgent({
  engine,
  task,
  tools,
  system = DEFAULT_SYSTEM,
  maxSteps = 6,
  toolChoice = 'auto',
  seed = 1,
  temperature,
  maxTokens = 96,
  signal,
  onEvent = () => {},
}) {
  if (!Number.isInteger(maxSteps) || maxSteps < 1) throw new RangeError(`maxSteps must be a positive integer; got ${maxSteps}`);
  const names = new Set();
  for (const t of tools) {
    if (names.has(t.name)) throw new Error(`two tools are named "${t.name}"`);
    names.add(t.name);
  }
  const defs = tools.map(definition);
  const messages = [...(system ? [{ role: 'system', content: system }] : []), { role: 'user', content: task }];
  const steps = [];

  for (let step = 1; step <= maxSteps; step++) {
    const choice = choiceOf(toolChoice, step, messages);
    onEvent({ type: 'step', step, toolChoice: choice });
    const stream = engine.chat(messages, { tools: defs, toolChoice: choice, maxTokens, seed: seed + step - 1, temperature, signal });
    for await (const chunk of stream) {
      for (const e of chunk.events) {
        if (e.type === 'content') onEvent({ type: 'content', step, delta: e.delta });
        else if (e.type === 'tool_call_start') onEvent({ type: 'tool_call', step, id: e.id, name: e.name });
        else onEvent({ type: 'tool_call_arguments', step, index: e.index, delta: e.delta });
      }
    }
    const reply = await stream.result;
    if (reply.reasoning) onEvent({ type: 'reasoning', step, text: reply.reasoning });
    const record = {
      step,
      toolChoice: choice,
      content: reply.content,
      reasoning: reply.reasoning,
      finishReason: reply.finishReason,
      promptTokens: reply.promptTokens,
      calls: [],
    };
    steps.push(record);

    if (reply.toolCalls.length === 0) {
      // A reply without calls is the answer (what a model that chooses freely does at the end).
      onEvent({ type: 'answer', step, answer: reply.content });
      return { answer: reply.content, stopReason: 'answer', steps, messages };
    }

    messages.push({
      role: 'assistant',
      content: reply.content,
      tool_calls: reply.toolCalls.map((c) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.argumentsText } })),
    });
    let answer = null;
    for (const call of reply.toolCalls) {
      const outcome = await runCall(tools, call);
      record.calls.push({ id: call.id, name: call.name, arguments: call.arguments, argumentsText: call.argumentsText, outcome });
      onEvent({ type: 'tool_result', step, id: call.id, name: call.name, outcome });
      if (outcome.ok && tools.find((t) => t.name === call.name)?.final) {
        answer ??= String(outcome.result);
        continue;
      }
      messages.push({ role: 'tool', tool_call_id: call.id, name: call.name, content: JSON.stringify(outcome) });
    }
    if (answer !== null) {
      onEvent({ type: 'answer', step, answer });
      return { answer, stopReason: 'answer', steps, messages };
    }
  }
  onEvent({ type: 'limit', step: maxSteps });
  return { answer: null, stopReason: 'max_steps', steps, messages };
}
