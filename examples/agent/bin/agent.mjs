#!/usr/bin/env node
// Runs the agent loop on a model with the demo tools. Needs `pnpm build` first.
//   node examples/agent/bin/agent.mjs            (bundled tiny model, CPU, demo folder and service)
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { createEngine } from '@moeflash/core';
import { eachToolInTurn, runAgent } from '../src/agent.mjs';
import { calculatorTool, finalAnswerTool, httpGetTool, listFiles, readFileTool } from '../src/tools.mjs';
import { startDemoServer } from '../src/demo-server.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '../../..');
const TASK = 'Read notes.txt, get /inventory from the local service, compute the value of the stock with the calculator, and give the answer.';

const help = `usage: agent.mjs [options]

  --model DIR          model folder (default models/moeflash-tiny-coder)
  --backend NAME       cpu | cuda | auto (default cpu)
  --task TEXT          what to do (default: the demo task over the demo folder and service)
  --root DIR           the folder read_file may read (default examples/agent/demo)
  --service URL        the service http_get talks to (default: a demo service started on 127.0.0.1)
  --tool-choice MODE   each: force each tool in turn, then final_answer (default; the tiny model
                       calls nothing by itself) | required: a call every step, the model picks the
                       tool | auto: the model decides (a reply without calls is the answer)
  --free-args          constrain paths only to their shape, not to the folder's files and the
                       service's routes
  --max-steps N        stop after N model calls (default 6)
  --seed N             sampling seed (default 1)
  --temperature T      (default: the model's generation_config.json)
  --json               print the outcome as JSON at the end
  -h, --help           this text`;

let values;
try {
  ({ values } = parseArgs({
    options: {
      model: { type: 'string', default: path.join(repo, 'models/moeflash-tiny-coder') },
      backend: { type: 'string', default: 'cpu' },
      task: { type: 'string', default: TASK },
      root: { type: 'string', default: path.join(here, '../demo') },
      service: { type: 'string' },
      'tool-choice': { type: 'string', default: 'each' },
      'free-args': { type: 'boolean', default: false },
      'max-steps': { type: 'string', default: '6' },
      seed: { type: 'string', default: '1' },
      temperature: { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  }));
} catch (e) {
  console.error(`${e.message}\n\n${help}`);
  process.exit(2);
}
if (values.help) {
  console.log(help);
  process.exit(0);
}
const mode = values['tool-choice'];
if (!['each', 'required', 'auto'].includes(mode)) {
  console.error(`--tool-choice must be each, required or auto; got ${mode}`);
  process.exit(2);
}

const demo = values.service ? null : await startDemoServer();
const engine = await createEngine({ model: values.model, backend: values.backend, log: (line) => console.error(line) });
try {
  const free = values['free-args'];
  const tools = [
    readFileTool({ root: values.root, choices: free ? undefined : await listFiles(values.root) }),
    httpGetTool({ baseUrl: values.service ?? demo.url, routes: free || !demo ? undefined : demo.routes }),
    calculatorTool(),
    finalAnswerTool(),
  ];
  const dim = (s) => (process.stdout.isTTY ? `\x1b[2m${s}\x1b[0m` : s);
  const outcome = await runAgent({
    engine,
    task: values.task,
    tools,
    toolChoice: mode === 'each' ? eachToolInTurn(tools) : mode,
    maxSteps: Number(values['max-steps']),
    seed: Number(values.seed),
    temperature: values.temperature === undefined ? undefined : Number(values.temperature),
    onEvent(e) {
      const out = process.stdout;
      if (e.type === 'step') out.write(dim(`\n[step ${e.step}] toolChoice ${JSON.stringify(e.toolChoice)}\n`));
      else if (e.type === 'content' || e.type === 'tool_call_arguments') out.write(e.delta);
      else if (e.type === 'reasoning') out.write(dim(`(reasoning) ${e.text}\n`));
      else if (e.type === 'tool_call') out.write(`-> ${e.name} `);
      else if (e.type === 'tool_result') out.write(`\n<- ${JSON.stringify(e.outcome)}\n`);
      else if (e.type === 'answer') out.write(`\n[answer after ${e.step} step(s)] ${e.answer}\n`);
      else if (e.type === 'limit') out.write(`\n[stopped: step limit ${e.step} reached without an answer]\n`);
    },
  });
  if (values.json) console.log(JSON.stringify({ answer: outcome.answer, stopReason: outcome.stopReason, steps: outcome.steps }, null, 2));
} finally {
  await engine.close();
  await demo?.close();
}
