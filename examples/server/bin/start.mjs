#!/usr/bin/env node
// Serve a model over an OpenAI-compatible HTTP API. Needs `pnpm build` first.
//   node examples/server/bin/start.mjs --model models/moeflash-tiny-coder --port 8000
import { parseArgs } from 'node:util';
import { startServer } from '../src/server.mjs';

const help = `usage: moeflash-server --model DIR [options]

  --model DIR            Hugging Face model folder (required)
  --backend NAME         auto | cpu | cuda (default auto)
  --host HOST            address to listen on (default 127.0.0.1: this machine only)
  --port N               port (default 8000; 0 picks a free one)
  --model-id ID          the id clients pass as "model" (default: the folder name)
  --max-batch N          most sequences in one step (default 16)
  --max-step-tokens N    most tokens in one step, prompt chunks included (default 256)
  --kv-pages N           KV cache pages (default: the backend's)
  --kv-page-size N       positions a KV page holds (default: the backend's)
  --no-prefix-cache      do not share KV pages between prompts with a common prefix
  --draft DIR            speculative decoding with this DFlash draft model
  --body-limit BYTES     largest request body (default 1048576)
  --max-tokens-limit N   largest max_tokens accepted (default: the model's context)
  --api-key KEY          require "Authorization: Bearer KEY" (default: $MOEFLASH_API_KEY, else none)
  --max-concurrent N     most requests generating at once; more get a 429 (default 256)
  --header-timeout MS    time a client has to send its request headers (default 10000)
  --idle-timeout MS      time a connection may be silent, or a stream unread (default 30000)
  -h, --help             this text

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream: true for server-sent
events), GET /v1/models, GET /health, GET /metrics (engine statistics).`;

let values;
try {
  ({ values } = parseArgs({
    options: {
      model: { type: 'string' },
      backend: { type: 'string', default: 'auto' },
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '8000' },
      'model-id': { type: 'string' },
      'max-batch': { type: 'string' },
      'max-step-tokens': { type: 'string' },
      'kv-pages': { type: 'string' },
      'kv-page-size': { type: 'string' },
      'no-prefix-cache': { type: 'boolean', default: false },
      draft: { type: 'string' },
      'body-limit': { type: 'string' },
      'max-tokens-limit': { type: 'string' },
      'api-key': { type: 'string' },
      'max-concurrent': { type: 'string' },
      'header-timeout': { type: 'string' },
      'idle-timeout': { type: 'string' },
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
if (!values.model) {
  console.error(`--model is required\n\n${help}`);
  process.exit(2);
}
const int = (name) => {
  const v = values[name];
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) {
    console.error(`--${name} must be a non-negative integer, got '${v}'`);
    process.exit(2);
  }
  return n;
};

const running = await startServer({
  model: values.model,
  backend: values.backend,
  host: values.host,
  port: int('port'),
  modelId: values['model-id'],
  maxBatch: int('max-batch'),
  maxStepTokens: int('max-step-tokens'),
  kvCache: { pages: int('kv-pages'), pageSize: int('kv-page-size'), prefixCaching: !values['no-prefix-cache'] },
  speculative: values.draft ? { method: 'dflash', draft: values.draft } : undefined,
  bodyLimit: int('body-limit'),
  maxTokensLimit: int('max-tokens-limit'),
  // From the environment, the key stays out of the process list.
  apiKey: values['api-key'] ?? (process.env.MOEFLASH_API_KEY || undefined),
  maxConcurrentRequests: int('max-concurrent'),
  headerTimeoutMs: int('header-timeout'),
  idleTimeoutMs: int('idle-timeout'),
}).catch((e) => {
  console.error(`moeflash-server: ${e.message}`);
  process.exit(1);
});
console.error(`moeflash-server: serving ${values.model} as '${running.modelId}' on ${running.url}/v1 (${running.engine.backend.name} backend)`);

let stopping = false;
const stop = (signal) => {
  if (stopping) process.exit(1); // a second signal: do not wait
  stopping = true;
  console.error(`moeflash-server: ${signal}: finishing running requests`);
  running.close({ timeoutMs: 10_000 }).then(() => process.exit(0), (e) => {
    console.error(`moeflash-server: ${e.message}`);
    process.exit(1);
  });
};
process.on('SIGINT', () => stop('SIGINT'));
process.on('SIGTERM', () => stop('SIGTERM'));
