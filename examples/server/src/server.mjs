// An OpenAI-compatible HTTP server on Node's http module. Every request becomes one engine
// request; the engine's scheduler batches whatever runs concurrently.
import http from 'node:http';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { createEngine } from '@moeflash/core';
import { ApiError, parseChatRequest, parseCompletionRequest } from './validate.mjs';
import { toolPlan } from './validate-tools.mjs';
import { chatLogprobsOf, completionLogprobsOf, deltaOf, finishReasonOf, tokenOffsets, toolCallsOf } from './openai-shape.mjs';
import { ConcurrencyGate, DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_MAX_CONCURRENT, apiKeyCheck, applyTimeouts, holdOpen, isLoopback } from './guard.mjs';

export { ApiError, parseChatRequest, parseCompletionRequest };

export const DEFAULT_BODY_LIMIT = 1024 * 1024;
/** A client that keeps sending past the limit is cut off after this much (the 413 is sent first). */
const DISCARD_LIMIT = 16 * 1024 * 1024;

/** Maps engine errors to OpenAI-style HTTP errors; anything unexpected is a 500. */
export function toApiError(e) {
  if (e instanceof ApiError) return e;
  if (e && e.name === 'MoeflashError' && typeof e.code === 'string') {
    switch (e.code) {
      case 'INVALID_ARGUMENT':
      case 'TOKENIZER_INVALID':
        return new ApiError(400, e.message);
      case 'OUT_OF_MEMORY':
        return new ApiError(400, e.message, { code: 'context_length_exceeded', param: 'max_tokens' });
      case 'CLOSED':
        return new ApiError(503, 'the server is shutting down; retry on another instance', { type: 'server_error' });
      default:
        break;
    }
  }
  return new ApiError(500, `internal error: ${e instanceof Error ? e.message : String(e)}`, { type: 'server_error' });
}

function sendJson(res, status, obj, headers = {}) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body), ...headers });
  res.end(body);
}

function sendError(res, err, log) {
  const api = toApiError(err);
  if (api.status >= 500 && api.status !== 503) log(`moeflash-server: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
  if (res.destroyed || res.writableEnded) return;
  if (res.headersSent) {
    // Mid-stream: the client library surfaces an `error` event as an exception.
    res.end(`data: ${JSON.stringify(api.toJSON())}\n\n`);
    return;
  }
  const headers = api.status === 413 ? { connection: 'close' } : api.status === 401 ? { 'www-authenticate': 'Bearer' } : api.status === 429 ? { 'retry-after': '1' } : {};
  sendJson(res, api.status, api.toJSON(), headers);
}

/** The request body, refusing more than `limit` bytes with a 413. */
function readBody(req, limit) {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length']);
    const tooLarge = () => new ApiError(413, `the request body exceeds the limit of ${limit} bytes`, { code: 'request_too_large' });
    if (Number.isFinite(declared) && declared > limit) {
      discard(req);
      reject(tooLarge());
      return;
    }
    const chunks = [];
    let size = 0;
    let over = false;
    req.on('data', (c) => {
      if (over) return;
      size += c.length;
      if (size > limit) {
        over = true;
        chunks.length = 0;
        discard(req);
        reject(tooLarge());
      } else chunks.push(c);
    });
    req.on('end', () => {
      if (!over) resolve(Buffer.concat(chunks));
    });
    req.on('error', reject);
  });
}

/** Drain what the client still sends, so that it reads the error; cut it off past a bound. */
function discard(req) {
  let seen = 0;
  req.on('data', (c) => {
    seen += c.length;
    if (seen > DISCARD_LIMIT) req.destroy();
  });
  req.resume();
}

function parseJson(buf) {
  const text = buf.toString('utf8');
  if (!text.trim()) throw new ApiError(400, 'the request body is empty; send a JSON object');
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ApiError(400, `the request body is not valid JSON: ${e.message}`);
  }
}

/**
 * Writes server-sent events with back-pressure: when the socket's buffer is full, waits for it to
 * drain (the engine then pauses this request once its own buffer fills) or for the client to go.
 * A client that reads nothing for `idleMs` is cut off, which aborts its request and frees its
 * KV pages: a paused request would otherwise hold them as long as the connection stays open.
 */
export function sseWriter(res, idleMs) {
  return async (obj) => {
    if (res.destroyed) return;
    if (res.write(`data: ${typeof obj === 'string' ? obj : JSON.stringify(obj)}\n\n`)) return;
    await new Promise((resolve) => {
      const timer = setTimeout(() => res.destroy(), idleMs);
      const done = () => {
        clearTimeout(timer);
        res.off('drain', done);
        res.off('close', done);
        resolve();
      };
      res.on('drain', done);
      res.on('close', done);
    });
  };
}

/**
 * The prompt's token ids, as engine.chat and engine.generate make them: for chat, the template's
 * rendering with the tools it offers, then a forced call's opening.
 */
function promptIds(engine, kind, parsed, plan) {
  if (kind === 'chat') {
    const text = engine.tokenizer.applyChatTemplate(parsed.messages, { addGenerationPrompt: true, tools: plan.offered });
    return engine.tokenizer.encode(text + (plan.forced?.prefix ?? ''), { addSpecialTokens: false });
  }
  return typeof parsed.prompt === 'string' ? engine.tokenizer.encode(parsed.prompt) : parsed.prompt;
}

/**
 * Output constraints compile when the request starts, after validation: a schema the grammar
 * compiler refuses is the client's error, and names the field it came from.
 */
function constraintError(e, parsed, plan) {
  if (!(e && e.name === 'MoeflashError' && e.code === 'INVALID_ARGUMENT')) return e;
  if (parsed.options.responseFormat) return new ApiError(400, e.message, { param: 'response_format' });
  if (plan?.forced) return new ApiError(400, `the called tool's 'parameters' schema cannot constrain its arguments: ${e.message}`, { param: 'tools' });
  return e;
}

const usageOf = (r) => ({ prompt_tokens: r.promptTokens, completion_tokens: r.tokens.length, total_tokens: r.promptTokens + r.tokens.length });

/**
 * @param {import('./server.d.mts').ServerOptions} opts
 * @returns {import('node:http').Server}
 */
export function createServer(opts) {
  const { engine } = opts;
  const log = opts.log ?? ((line) => console.error(line));
  const modelId = opts.modelId ?? 'moeflash';
  const limits = {
    modelId,
    maxTokensLimit: opts.maxTokensLimit ?? engine.spec.attention.maxPositionEmbeddings,
    defaultMaxTokens: opts.defaultMaxTokens ?? engine.generationConfig.maxNewTokens ?? 256,
    vocabSize: engine.spec.vocabSize,
  };
  const bodyLimit = opts.bodyLimit ?? DEFAULT_BODY_LIMIT;
  const contextLength = engine.spec.attention.maxPositionEmbeddings;
  const checkKey = apiKeyCheck(opts.apiKey);
  const gate = new ConcurrencyGate(opts.maxConcurrentRequests ?? DEFAULT_MAX_CONCURRENT);
  const idleMs = opts.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS;
  const created = Math.floor(Date.now() / 1000);
  const modelCard = { id: modelId, object: 'model', created, owned_by: 'moeflash' };

  async function generate(req, res, kind) {
    gate.enter(res);
    const body = parseJson(await readBody(req, bodyLimit));
    holdOpen(req);
    const parsed = kind === 'chat' ? parseChatRequest(body, limits) : parseCompletionRequest(body, limits);
    const plan = kind === 'chat' ? toolPlan(engine.tokenizer.chatTemplate, parsed.tools, parsed.toolChoice) : null;
    const ids = promptIds(engine, kind, parsed, plan);
    if (ids.length >= contextLength) {
      const param = kind === 'chat' ? 'messages' : 'prompt';
      throw new ApiError(400, `the prompt is ${ids.length} tokens but this model's context is ${contextLength} tokens (the prompt and at least one new token must fit); shorten the ${param}`, { param, code: 'context_length_exceeded' });
    }
    // A client that goes away aborts its request: the scheduler drops it at the next step.
    const ac = new AbortController();
    res.on('close', () => {
      if (!res.writableFinished) ac.abort();
    });
    if (res.destroyed) return;
    const genOpts = { ...parsed.options, signal: ac.signal };
    // engine.chat renders and encodes what promptIds counted, and reads the reply for tool calls.
    const stream = kind === 'chat' ? engine.chat(parsed.messages, { ...genOpts, tools: parsed.tools, toolChoice: parsed.toolChoice }) : engine.generate(ids, genOpts);
    const id = `${kind === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomUUID().replace(/-/g, '')}`;
    const now = Math.floor(Date.now() / 1000);
    const head = (object) => ({ id, object, created: now, model: modelId });
    const fail = (e) => {
      throw constraintError(e, parsed, plan);
    };

    if (!parsed.stream) {
      // Text offsets of completion logprobs come from the chunks; everything else is in the result.
      const offsets = [];
      if (kind === 'completion' && parsed.options.logprobs) {
        let length = 0;
        try {
          for await (const c of stream) {
            offsets.push(...tokenOffsets(length, c));
            length += c.text.length;
          }
        } catch (e) {
          fail(e);
        }
      }
      const r = await stream.result.catch(fail);
      if (r.finishReason === 'abort' || res.destroyed) return;
      let choice;
      if (kind === 'chat') {
        const calls = toolCallsOf(r.toolCalls);
        const message = { role: 'assistant', content: calls.length && !r.content ? null : r.content, refusal: null };
        if (calls.length) message.tool_calls = calls;
        if (r.reasoning) message.reasoning_content = r.reasoning;
        choice = { index: 0, message, logprobs: chatLogprobsOf(r.logprobs), finish_reason: finishReasonOf(r, r.toolCalls) };
      } else {
        choice = { index: 0, text: r.text, logprobs: r.logprobs ? completionLogprobsOf(r.logprobs, offsets) : null, finish_reason: finishReasonOf(r) };
      }
      sendJson(res, 200, { ...head(kind === 'chat' ? 'chat.completion' : 'text_completion'), choices: [choice], usage: usageOf(r) });
      return;
    }

    // Headers wait for the first chunk, so that a request that fails to start (a schema the
    // grammar compiler refuses) still gets its 4xx instead of a broken stream.
    const chunks = stream[Symbol.asyncIterator]();
    const next = () => chunks.next().catch(fail);
    let step = await next();
    if (res.destroyed) {
      await chunks.return?.();
      return;
    }
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no' });
    const send = sseWriter(res, idleMs);
    const object = kind === 'chat' ? 'chat.completion.chunk' : 'text_completion';
    const event = (choice) => send({ ...head(object), choices: [{ index: 0, ...choice }] });
    if (kind === 'chat') await event({ delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null });
    let length = 0;
    for (; !step.done; step = await next()) {
      if (res.destroyed) {
        await chunks.return?.();
        break;
      }
      const chunk = step.value;
      const lps = chunk.logprobs?.length ? chunk.logprobs : null;
      if (kind === 'chat') {
        // Logprobs go with the chunk that generated their tokens; text the tool-call parser holds back follows later.
        const delta = deltaOf(chunk.events);
        if (Object.keys(delta).length || lps) await event({ delta, logprobs: chatLogprobsOf(lps ?? undefined), finish_reason: null });
      } else if (chunk.text || lps) {
        await event({ text: chunk.text, logprobs: lps ? completionLogprobsOf(lps, tokenOffsets(length, chunk)) : null, finish_reason: null });
      }
      length += chunk.text.length;
    }
    const r = await stream.result.catch(fail);
    if (r.finishReason === 'abort' || res.destroyed) return;
    const finish = finishReasonOf(r, r.toolCalls);
    await event(kind === 'chat' ? { delta: {}, logprobs: null, finish_reason: finish } : { text: '', logprobs: null, finish_reason: finish });
    if (parsed.includeUsage) await send({ ...head(object), choices: [], usage: usageOf(r) });
    await send('[DONE]');
    res.end();
  }

  async function route(req, res) {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const p = url.pathname.replace(/\/+$/, '') || '/';
    const only = (method) => {
      if (req.method !== method) throw new ApiError(405, `${req.method} is not allowed on ${p}; use ${method}`, { code: 'method_not_allowed' });
    };
    if (p === '/health') {
      only('GET');
      return sendJson(res, 200, { status: 'ok' });
    }
    // Liveness stays open (load balancers probe it without a key); everything else needs the key.
    checkKey(req);
    if (p === '/v1/chat/completions' || p === '/v1/completions') {
      only('POST');
      return generate(req, res, p === '/v1/chat/completions' ? 'chat' : 'completion');
    }
    if (p === '/v1/models') {
      only('GET');
      return sendJson(res, 200, { object: 'list', data: [modelCard] });
    }
    if (p.startsWith('/v1/models/')) {
      only('GET');
      const name = decodeURIComponent(p.slice('/v1/models/'.length));
      if (name !== modelId) throw new ApiError(404, `The model '${name.slice(0, 200)}' does not exist`, { code: 'model_not_found', param: 'model' });
      return sendJson(res, 200, modelCard);
    }
    if (p === '/metrics') {
      only('GET');
      return sendJson(res, 200, engine.stats());
    }
    throw new ApiError(404, `no route ${req.method} ${p.slice(0, 200)}; see POST /v1/chat/completions, POST /v1/completions, GET /v1/models`, { code: 'not_found' });
  }

  // Node checks the header timeout on this interval: a quarter of it keeps the 408 within 25 % of the limit.
  const checkEvery = Math.max(25, Math.min(1000, Math.floor((opts.headerTimeoutMs ?? 4000) / 4)));
  const server = http.createServer({ connectionsCheckingInterval: checkEvery }, (req, res) => {
    route(req, res).catch((err) => sendError(res, err, log));
  });
  applyTimeouts(server, { headerTimeoutMs: opts.headerTimeoutMs, idleTimeoutMs: idleMs });
  return server;
}

/**
 * Load a model and serve it: resolves once the server listens.
 * @param {import('./server.d.mts').StartOptions} opts
 */
export async function startServer(opts) {
  const log = opts.log ?? ((line) => console.error(line));
  const engine = await createEngine({
    model: opts.model,
    backend: opts.backend ?? 'auto',
    log,
    maxBatch: opts.maxBatch,
    maxStepTokens: opts.maxStepTokens,
    kvCache: opts.kvCache,
    speculative: opts.speculative,
  });
  const modelId = opts.modelId ?? path.basename(path.resolve(opts.model));
  const host = opts.host ?? '127.0.0.1';
  if (!isLoopback(host) && !opts.apiKey) {
    log(`moeflash-server: listening on ${host} without --api-key: anyone who can reach this address can use the model`);
  }
  let server;
  try {
    server = createServer({ ...opts, engine, log, modelId });
  } catch (e) {
    await engine.close();
    throw e;
  }
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 8000, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const addr = server.address();
  const urlHost = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  let closing = null;
  return {
    server,
    engine,
    modelId,
    url: `http://${urlHost}:${addr.port}`,
    /** Stop listening, let running requests finish (up to `timeoutMs`), then free the model. */
    close({ timeoutMs = 30_000 } = {}) {
      closing ??= (async () => {
        const stopped = new Promise((resolve) => server.close(() => resolve()));
        server.closeIdleConnections();
        await engine.close({ drain: true, timeoutMs });
        server.closeAllConnections();
        await stopped;
      })();
      return closing;
    },
  };
}
