import { EventEmitter } from 'eventemitter3';
import path from 'node:path';
import type { Backend, KvCacheOptions, KvPageStats, LoadedModel, LoadProgress } from '../backends/backend.js';
import { importOptional, type BackendChoice } from '../backends/registry.js';
import { MoeflashError } from '../errors.js';
import type { ModelSpec } from '../model/spec.js';
import { argmax, sampleToken, validateSamplingParams, type SamplingParams } from '../sampling/sample.js';
import { ChatTemplate, type ChatMessage } from '../tokenizer/chat.js';
import { loadGenerationConfig, stopTokenIds, type GenerationConfig } from '../tokenizer/generation-config.js';
import { loadTokenizer, StreamDecoder, type TextTokenizer } from '../tokenizer/tokenizer.js';
import { loadModel } from './load.js';
import { ChunkStream } from './chunk-stream.js';
import { Scheduler, type StepInfo } from './scheduler.js';
import type { Proposal, SpeculationContext, SpeculationStats, Speculator, SpeculatorFactoryInput } from './speculation.js';
import { StopStringFilter } from './stop-strings.js';
import { GrammarCompiler } from '../grammar/grammar-compiler.js';
import { outputGrammar, type GrammarOption, type ResponseFormat } from '../grammar/response-format.js';
import { TokenConstraint } from '../grammar/token-constraint.js';
import { tokenTable, type TokenTable } from '../grammar/token-bytes.js';
import { logprobsRequest, rowLogprobs, type LogprobToken, type RowLogprobs, type TokenLogprob } from '../sampling/logprobs.js';
import { applyTokenMasks, type TokenMask } from '../sampling/token-mask.js';
import { forcedCall, validateTools, type ToolChoice, type ToolDefinition } from '../tools/chat-tools.js';
import { toolCallFormat } from '../tools/tool-calls.js';
import { chatStream, type ChatStream } from '../tools/chat-stream.js';

export interface EngineOptions {
  /** Folder of an HF model: config.json, safetensors, tokenizer files. */
  model: string;
  /** Where to run: `auto` (CUDA when usable, else CPU), `cpu`, `cuda`, or a Backend object. */
  backend?: BackendChoice;
  /** Most sequences in one step (default 16). */
  maxBatch?: number;
  /**
   * Most tokens in one step, decode tokens and prompt chunks together (default 256): a long
   * prompt is prefilled in chunks between the decode steps of running requests.
   */
  maxStepTokens?: number;
  /** Most prompt tokens of one request in one step (default maxStepTokens). */
  prefillChunk?: number;
  /**
   * Chunks a streaming consumer may fall behind before its request pauses (default 64). A
   * request whose stream nobody iterates never pauses.
   */
  streamBuffer?: number;
  /** KV page pool (backends that page their cache): page size, pages or bytes, prefix caching. */
  kvCache?: KvCacheOptions;
  /** Refuse NaN or infinite weights at load (reads the checkpoint once more; the CLI sets it). */
  checkFiniteWeights?: boolean;
  /** Called for one line of diagnostics (default console.warn). */
  log?: (line: string) => void;
  /**
   * Listeners attached before loading starts, so that `load:progress` and `load:done` reach them
   * (`createEngine` resolves only after the load).
   */
  on?: Partial<EngineEvents>;
  /**
   * Speculative decoding (needs @moeflash/speculative): DFlash with a draft model folder, or
   * prompt lookup (n-gram drafts from the prompt and output, no weights).
   */
  speculative?:
    | { method: 'dflash'; draft: string; blockSize?: number; [option: string]: unknown }
    | { method: 'prompt-lookup'; blockSize?: number; [option: string]: unknown };
}

interface SpeculativeModule {
  createSpeculator(input: SpeculatorFactoryInput): Promise<Speculator>;
}

export interface GenerateOptions extends SamplingParams {
  /** Most new tokens (default: generation_config.json's max_new_tokens, else 256); never past the model's context. */
  maxTokens?: number;
  /** Generation ends before any of these strings; it is not part of the output. */
  stop?: string[];
  /** Ends the request within one step; the stream then ends with finishReason 'abort'. */
  signal?: AbortSignal;
  /** Stop token ids in addition to the model's end-of-sequence ids. */
  stopTokenIds?: number[];
  /** Keep generating past end-of-sequence tokens (benchmarks). */
  ignoreEos?: boolean;
  /** Random stream of this request (with `seed`): equal seeds and streams reproduce a run. */
  stream?: number;
  /** Per-request speculation: `false` turns it off, an object overrides the engine's block size. */
  speculative?: false | { blockSize?: number };
  /** Scheduling priority: higher runs first (default 0); equal priorities are first come, first served. */
  priority?: number;
  /**
   * Constrain the output to JSON (`{ type: 'json_object' }`) or to JSON under a schema
   * (`{ type: 'json_schema', schema }`): at every step only tokens that keep the output a valid
   * prefix can be drawn, and the request ends with the model's end-of-sequence token once the
   * value is complete. OpenAI's `{ type: 'json_schema', json_schema: { schema } }` is taken too.
   */
  responseFormat?: ResponseFormat;
  /** Constrain the output to an EBNF grammar (`root ::= "yes" | "no"`; xgrammar's dialect). */
  grammar?: GrammarOption;
  /** Report each generated token's log-probability (chunk.logprobs, result.logprobs). */
  logprobs?: boolean;
  /** With `logprobs`: also the this many most likely tokens at each position (0 to 20). */
  topLogprobs?: number;
}

/** Options of `chat()`: those of `generate()`, and tools in OpenAI's shape. */
export interface ChatOptions extends GenerateOptions {
  tools?: ToolDefinition[];
  /** 'auto' (default): the model decides; 'none': tools not offered; 'required' or a named function: the reply is a call. */
  toolChoice?: ToolChoice;
}

/** One streamed piece of output. */
export interface GenerateChunk {
  /** Text added since the last chunk (may be empty while a multi-byte character completes). */
  text: string;
  /** New token ids. */
  tokens: number[];
  /** With GenerateOptions.logprobs: one entry a token of `tokens`. */
  logprobs?: TokenLogprob[];
}

export type FinishReason = 'stop' | 'length' | 'abort';

export interface GenerateResult {
  text: string;
  tokens: number[];
  finishReason: FinishReason;
  promptTokens: number;
  /** Seconds from submission to the first token, and tokens per second after it. */
  timeToFirstToken: number;
  tokensPerSecond: number;
  /** Seconds from submission to the request's first step. */
  queueTime: number;
  /** Prompt tokens whose KV came from the prefix cache instead of being computed. */
  cachedPromptTokens: number;
  /** Times the scheduler took this request's cache to make room (each costs a recomputation). */
  preemptions: number;
  /** Speculative decoding statistics, when the engine speculates. */
  speculation?: SpeculationStats;
  /** With GenerateOptions.logprobs: one entry a token of `tokens`. */
  logprobs?: TokenLogprob[];
}

/** The stream `generate()` returns: iterate it for chunks; `result` settles when it ends. */
export interface GenerateStream extends AsyncIterable<GenerateChunk> {
  readonly result: Promise<GenerateResult>;
}

export interface EngineEvents {
  'load:progress': (p: LoadProgress) => void;
  'load:done': (info: { ms: number; backend: string; memory: ReturnType<LoadedModel['memory']> }) => void;
  step: (info: StepInfo) => void;
  /** A request got its first step. */
  'request:start': (info: { queueTime: number; promptTokens: number; cachedPromptTokens: number }) => void;
  'request:done': (r: GenerateResult) => void;
  /** A sequence's cache was freed to make room; it will be recomputed. */
  'request:preempted': (info: { positions: number }) => void;
}

/** Engine counters, from {@link Engine.stats}. */
export interface EngineStats {
  requests: {
    /** Waiting for a slot (never started, or preempted). */
    queued: number;
    /** Admitted, paused ones included. */
    running: number;
    /** Admitted but sitting out because their consumers are behind. */
    paused: number;
    completed: number;
    aborted: number;
    failed: number;
    /** Refused at submission (could never fit). */
    rejected: number;
  };
  steps: number;
  /** Mean over steps of sequences / maxBatch. */
  batchOccupancy: number;
  maxBatch: number;
  promptTokens: number;
  generatedTokens: number;
  preemptions: number;
  /** KV pages (backends that page their cache), else null. */
  kvPages: KvPageStats | null;
  prefixCache: { lookupTokens: number; hitTokens: number; hitRate: number };
  /** Means over finished requests, seconds. */
  meanTimeToFirstToken: number;
  meanQueueTime: number;
}

/** A loaded model ready to generate; create it with {@link createEngine}. */
export class Engine extends EventEmitter<EngineEvents> {
  private scheduler!: Scheduler;
  private closed = false;

  private constructor(
    readonly spec: ModelSpec,
    readonly tokenizer: TextTokenizer,
    readonly generationConfig: GenerationConfig,
    private readonly chatTemplate: ChatTemplate | null,
    readonly backend: Backend,
    private readonly log: (line: string) => void,
    private readonly dir: string,
  ) {
    super();
  }

  /** @internal */
  static async create(opts: EngineOptions): Promise<Engine> {
    // Checked before the load, which may take minutes.
    for (const key of ['maxBatch', 'maxStepTokens', 'prefillChunk', 'streamBuffer'] as const) {
      const v = opts[key];
      if (v !== undefined && !(Number.isInteger(v) && v >= 1)) {
        throw new MoeflashError('INVALID_ARGUMENT', `${key} must be a positive integer, got ${String(v)}`);
      }
    }
    const dir = path.resolve(opts.model);
    const log = opts.log ?? ((l: string) => console.warn(l));
    const tokenizer = await loadTokenizer(dir);
    const genConfig = await loadGenerationConfig(dir);
    const chat = tokenizer.chatTemplate;
    const handle = await loadModel({
      model: dir,
      backend: opts.backend,
      log,
      onProgress: opts.on?.['load:progress'],
      kvCache: opts.kvCache,
      checkFiniteWeights: opts.checkFiniteWeights,
    });
    const engine = new Engine(handle.spec, tokenizer, genConfig, chat, handle.backend, log, dir);
    for (const [event, fn] of Object.entries(opts.on ?? {})) engine.on(event as keyof EngineEvents, fn as never);
    const model = handle.model;
    engine.model = model;
    engine.stopIds = new Set(stopTokenIds(handle.spec.eosTokenIds, genConfig, tokenizer));
    if (opts.speculative) {
      const mod = await importOptional<SpeculativeModule>('@moeflash/speculative');
      if (typeof mod === 'string') {
        await model.dispose();
        throw new MoeflashError('BACKEND_UNAVAILABLE', `speculative decoding needs ${mod}`);
      }
      const { method, ...options } = opts.speculative;
      engine.speculator = await mod.createSpeculator({ target: model, targetSpec: handle.spec, targetDir: dir, options: { method, ...options } });
    }
    engine.maxBatch = opts.maxBatch ?? 16;
    engine.streamBuffer = opts.streamBuffer ?? 64;
    engine.scheduler = new Scheduler(model, {
      maxBatch: engine.maxBatch,
      maxStepTokens: opts.maxStepTokens ?? 256,
      prefillChunk: opts.prefillChunk,
      onStep: (info) => engine.emit('step', info),
      onPreempt: (info) => engine.emit('request:preempted', { positions: info.positions }),
    });
    engine.emit('load:done', { ms: handle.loadMs, backend: handle.backend.name, memory: model.memory() });
    return engine;
  }

  /** The model on its backend (for tools that drive steps themselves, such as `moeflash logits`). */
  model!: LoadedModel;
  private stopIds = new Set<number>();
  /** The speculative method, when EngineOptions.speculative set one. */
  speculator: Speculator | null = null;
  private maxBatch = 16;
  private streamBuffer = 64;
  private readonly counters = { completed: 0, aborted: 0, failed: 0, rejected: 0, promptTokens: 0, generatedTokens: 0, ttftSum: 0, queueSum: 0, finished: 0 };

  /**
   * The fatal backend error (a device fault: MoeflashError.fatal) that ended this engine, or null
   * while it works. After one, every request that was pending has failed, generate() throws a
   * DEVICE_ERROR naming it, and only close() is left to call.
   */
  get fault(): unknown {
    return this.scheduler.fault;
  }

  /** Counters of the scheduler, the KV cache and finished requests. */
  stats(): EngineStats {
    const s = this.scheduler.stats();
    const c = this.counters;
    return {
      requests: { queued: s.queued, running: s.running, paused: s.paused, completed: c.completed, aborted: c.aborted, failed: c.failed, rejected: c.rejected },
      steps: s.steps,
      batchOccupancy: s.batchOccupancy,
      maxBatch: this.maxBatch,
      promptTokens: c.promptTokens,
      generatedTokens: c.generatedTokens,
      preemptions: s.preemptions,
      kvPages: s.kvPages,
      prefixCache: { lookupTokens: s.prefixLookupTokens, hitTokens: s.prefixHitTokens, hitRate: s.prefixLookupTokens ? s.prefixHitTokens / s.prefixLookupTokens : 0 },
      meanTimeToFirstToken: c.finished ? c.ttftSum / c.finished : 0,
      meanQueueTime: c.finished ? c.queueSum / c.finished : 0,
    };
  }

  /** Generate from a prompt string (tokenized as is) or from token ids. */
  generate(prompt: string | number[], opts: GenerateOptions = {}): GenerateStream {
    if (this.closed) throw new MoeflashError('CLOSED', 'the engine is closed; create a new one');
    const refused = this.scheduler.refusal();
    if (refused) throw refused;
    const params = this.samplingDefaults(opts);
    validateSamplingParams(params);
    const grammar = outputGrammar(opts.responseFormat, opts.grammar);
    const topLogprobs = logprobsRequest(opts.logprobs, opts.topLogprobs);
    const ids = typeof prompt === 'string' ? this.tokenizer.encode(prompt) : [...prompt];
    if (ids.length === 0) throw new MoeflashError('INVALID_ARGUMENT', 'the prompt is empty: give at least one token');
    const requested = opts.maxTokens ?? this.generationConfig.maxNewTokens ?? 256;
    if (!Number.isInteger(requested) || requested < 0) {
      throw new MoeflashError('INVALID_ARGUMENT', `maxTokens must be a non-negative integer, got ${requested}`);
    }
    const contextLength = this.spec.attention.maxPositionEmbeddings;
    if (ids.length >= contextLength) {
      throw new MoeflashError(
        'INVALID_ARGUMENT',
        `the prompt has ${ids.length} tokens but the model's context holds ${contextLength} positions (max_position_embeddings in ${this.spec.source}); shorten the prompt`,
      );
    }
    // Generation stops at the end of the context with finishReason 'length'.
    const maxTokens = Math.min(requested, contextLength - ids.length);
    const priority = opts.priority ?? 0;
    if (typeof priority !== 'number' || !Number.isFinite(priority)) {
      throw new MoeflashError('INVALID_ARGUMENT', `priority must be a finite number, got ${String(opts.priority)}`);
    }
    const stopIds = new Set([...(opts.ignoreEos ? [] : this.stopIds), ...(opts.stopTokenIds ?? [])]);
    if (grammar && stopIds.size === 0) {
      throw new MoeflashError('INVALID_ARGUMENT', 'a constrained request ends with a stop token once its output is complete, but it has none (ignoreEos, or a model without eos_token_id): pass stopTokenIds');
    }
    /** The request's grammar state; disposed when the request ends, however it ends. */
    const constraint = grammar ? new TokenConstraint(this.grammarCompiler(), grammar, stopIds) : null;
    const logprobsOut: TokenLogprob[] | undefined = topLogprobs === null ? undefined : [];
    const stream = new ChunkStream<GenerateChunk>({ highWaterMark: this.streamBuffer, onPull: () => this.scheduler.wake() });
    const decoder = new StreamDecoder(this.tokenizer);
    const stops = new StopStringFilter(opts.stop ?? []);
    /** The prompt, then every emitted token: what the scheduler keeps in the cache. */
    const context = [...ids];
    const generated: number[] = [];
    let text = '';
    let finishReason: FinishReason = 'length';
    const t0 = performance.now();
    let tFirst = 0;
    let tStart = 0;
    let cachedPromptTokens = 0;
    let preemptions = 0;
    let resolveResult!: (r: GenerateResult) => void;
    let rejectResult!: (e: unknown) => void;
    const result = new Promise<GenerateResult>((res, rej) => {
      resolveResult = res;
      rejectResult = rej;
    });
    result.catch(() => {}); // the stream reports the error too; an unobserved result must not crash the process
    const emit = (chunk: GenerateChunk) => {
      text += chunk.text;
      stream.push(chunk);
    };
    const aborted = () => opts.signal?.aborted === true || stream.abandoned;
    const wake = () => this.scheduler.wake();
    opts.signal?.addEventListener('abort', wake, { once: true });

    let settled = false;
    let speculation: SpeculationStats | undefined;
    const finish = () => {
      if (settled) return;
      settled = true;
      constraint?.dispose();
      opts.signal?.removeEventListener('abort', wake);
      if (finishReason !== 'abort' && aborted()) finishReason = 'abort';
      let rest = '';
      if (finishReason !== 'abort') {
        rest = stops.push(decoder.flush());
        if (stops.stopped) finishReason = 'stop';
        rest += stops.flush();
      }
      if (rest) emit({ text: rest, tokens: [] });
      stream.end();
      const now = performance.now();
      const r: GenerateResult = {
        text,
        tokens: generated,
        finishReason,
        promptTokens: ids.length,
        timeToFirstToken: tFirst ? (tFirst - t0) / 1000 : 0,
        tokensPerSecond: generated.length > 1 && tFirst ? ((generated.length - 1) * 1000) / (now - tFirst) : 0,
        queueTime: ((tStart || now) - t0) / 1000,
        cachedPromptTokens,
        preemptions,
        speculation,
        logprobs: logprobsOut,
      };
      const c = this.counters;
      if (finishReason === 'abort') c.aborted++;
      else c.completed++;
      c.finished++;
      c.promptTokens += ids.length;
      c.generatedTokens += generated.length;
      c.ttftSum += r.timeToFirstToken;
      c.queueSum += r.queueTime;
      resolveResult(r);
      this.emit('request:done', r);
    };

    if (maxTokens === 0) {
      queueMicrotask(finish);
      return { [Symbol.asyncIterator]: () => stream[Symbol.asyncIterator](), result };
    }

    const V = this.spec.vocabSize;
    let speculator = opts.speculative === false ? null : this.speculator?.forRequest(opts.speculative ?? {}) ?? null;
    // Rounds on the backend accept greedily; a sampled request there decodes plainly.
    if (speculator?.onDevice && params.temperature !== 0) speculator = null;
    // They also check no grammar and report no logprobs: such requests speculate on the host or not at all.
    if (speculator?.onDevice && (constraint || logprobsOut)) speculator = null;
    const device = speculator?.onDevice ?? null;
    let roundStart = 0;
    const ctx = (cacheLength: number): SpeculationContext => ({
      tokens: context.slice(),
      cacheLength,
      params,
      stream: opts.stream ?? 0,
    });
    let proposal: Proposal | null = null;
    let lengthBefore = 0;
    /** With a grammar: the allowed tokens of each verify row of the proposal (row i follows i drafts). */
    let rowMasks: TokenMask[] = [];

    /**
     * Emit tokens in order until one ends the request; true while it goes on. `rows[i]` is the
     * logits row tokens[i] was drawn from (for logprobs), or its log-probabilities from the backend.
     */
    const accept = (tokens: number[], rows?: Array<RowLogprobs | { logits: Float32Array; row: number }>): boolean => {
      for (const [i, token] of tokens.entries()) {
        if (!tFirst) tFirst = performance.now();
        if (stopIds.has(token)) {
          finishReason = 'stop';
          return false;
        }
        constraint?.accept(token);
        generated.push(token);
        context.push(token);
        const delta = stops.push(decoder.push([token]));
        const lp = logprobsOut && rows ? this.tokenLogprob(token, rows[i]!, topLogprobs!) : undefined;
        if (lp) logprobsOut!.push(lp);
        emit(lp ? { text: delta, tokens: [token], logprobs: [lp] } : { text: delta, tokens: [token] });
        if (stops.stopped) {
          finishReason = 'stop';
          return false;
        }
        if (generated.length >= maxTokens) return false;
      }
      return true;
    };

    try {
      this.scheduler.submit({
        priority,
        maxPositions: ids.length + maxTokens,
        hiddenLayers: !device && speculator?.hiddenLayers.length ? speculator.hiddenLayers : undefined,
        absorb: device ? true : undefined,
        deviceRound: device
          ? (_seq, max) => {
              roundStart = performance.now();
              return Math.max(0, Math.min(device.nextBlockSize(), maxTokens - generated.length - 1, max));
            }
          : undefined,
        context: () => context,
        ready: () => !stream.full(),
        cancelled: aborted,
        started: (info) => {
          tStart = performance.now();
          cachedPromptTokens = info.cachedTokens;
          this.emit('request:start', { queueTime: (tStart - t0) / 1000, promptTokens: ids.length, cachedPromptTokens });
        },
        prepare: constraint ? () => constraint.prepare() : undefined,
        fail: (e) => {
          if (settled) return;
          settled = true;
          constraint?.dispose();
          opts.signal?.removeEventListener('abort', wake);
          this.counters.failed++;
          speculator?.release();
          stream.fail(e);
          rejectResult(e);
        },
        finished: () => {
          if (speculator) speculation = speculator.stats();
          speculator?.release();
          finish();
        },
        preempted: () => {
          preemptions++;
          proposal = null;
          // The drafter's cache mirrors the target's; both are rebuilt from the history.
          speculator?.release();
        },
        draft: speculator && !device
          ? async (seq, max) => {
              proposal = null;
              lengthBefore = seq.length;
              const room = Math.min(maxTokens - generated.length - 1, max);
              const p = await speculator.propose(ctx(lengthBefore));
              if (p.tokens.length > room) {
                const keep = Math.max(0, room);
                p.tokens = p.tokens.slice(0, keep);
                if (p.q) p.q = p.q.subarray(0, keep * V);
              }
              if (constraint) {
                // Drafts are checked against the grammar: the first one outside its mask is rejected
                // here, with the rest; the verify rows are then masked like any step's logits.
                const checked = await constraint.draftMasks(p.tokens);
                p.tokens = p.tokens.slice(0, checked.kept);
                if (p.q) p.q = p.q.subarray(0, checked.kept * V);
                rowMasks = checked.masks;
              }
              proposal = p;
              return p.tokens;
            }
          : undefined,
        chunk: speculator && !device ? (out, seq) => void speculator!.prefilled(ctx(seq.length), out) : undefined,
        advance: (out, seq) => {
          if (device) {
            const ms = performance.now() - roundStart;
            if (out.speculation) {
              device.record(out.speculation.blockSize, out.speculation.accepted, ms);
              return accept(out.speculation.emitted);
            }
            device.record(0, 0, ms);
          }
          if (speculator && proposal) {
            const judged = constraint ? { ...out, logits: applyTokenMasks(out.logits, V, rowMasks.slice(0, out.rows)) } : out;
            const verdict = speculator.verify(ctx(lengthBefore), proposal, judged);
            proposal = null;
            seq.truncate(lengthBefore + 1 + verdict.accepted);
            return accept(verdict.emit, verdict.emit.map((_, row) => ({ logits: out.logits, row })));
          }
          if (out.sampled !== undefined) {
            // The backend drew the token with the key `sample` below gave it.
            if (out.sampled < 0) {
              throw new MoeflashError('INVALID_ARGUMENT', 'sampling: the step\'s logits hold NaN or +Infinity, or are all -Infinity, so no token can be sampled');
            }
            return accept([out.sampled], out.logprobs ? [out.logprobs] : undefined);
          }
          const raw = out.logits.subarray((out.rows - 1) * V, out.rows * V);
          // The grammar's mask: disallowed tokens at -Infinity before any sampling transform.
          const logits = constraint ? applyTokenMasks(raw, V, [constraint.mask()]) : raw;
          const token =
            params.temperature === 0
              ? argmax(logits)
              : sampleToken(logits, params, { seed: params.seed ?? 0, seq: opts.stream ?? 0, position: seq.length });
          return accept([token], [{ logits: raw, row: 0 }]);
        },
        // A backend that samples draws the same token from the same key (position: the cache
        // length after the step, as seq.length above), so only the token has to come back.
        // A grammar mask or logprobs go with the draw only to a backend that can apply them; for
        // any other, the logits come back and the lines above do it.
        sample:
          speculator && !device
            ? undefined
            : (position) => {
                const can = this.model.samplingFeatures;
                if ((constraint && !can?.allowedTokens) || (logprobsOut && !can?.logprobs)) return undefined;
                return {
                  params,
                  key: { seed: params.seed ?? 0, seq: opts.stream ?? 0, position },
                  ...(constraint ? { allowedTokens: constraint.mask() } : {}),
                  ...(logprobsOut ? { logprobs: topLogprobs! } : {}),
                };
              },
      });
    } catch (e) {
      settled = true;
      constraint?.dispose();
      opts.signal?.removeEventListener('abort', wake);
      this.counters.rejected++;
      speculator?.release();
      throw e;
    }
    return { [Symbol.asyncIterator]: () => stream[Symbol.asyncIterator](), result };
  }

  /**
   * Apply the model's chat template to `messages` and generate the assistant's reply. With
   * `tools`, the template renders them and the reply is read for tool calls in the template's
   * format (Qwen's <tool_call> blocks, gpt-oss's harmony): chunks carry `events` (content and
   * tool-call deltas), `result` the parsed `toolCalls`. Feed results back as
   * `{ role: 'tool', content }` messages after the assistant's `{ role: 'assistant', tool_calls }`.
   */
  chat(messages: ChatMessage[], opts: ChatOptions = {}): ChatStream {
    if (!this.chatTemplate) {
      throw new MoeflashError('TOKENIZER_INVALID', `the model in ${this.dir} has no chat template (tokenizer_config.json chat_template or chat_template.jinja); use generate() with a prompt instead`);
    }
    const { tools, toolChoice, ...gen } = opts;
    validateTools(tools, toolChoice);
    const offered = tools?.length && toolChoice !== 'none' ? tools : undefined;
    let prompt = this.chatTemplate.apply(messages, { addGenerationPrompt: true, tools: offered });
    const format = offered ? toolCallFormat(this.chatTemplate.source({ tools: offered })) : null;
    if (offered && !format) {
      throw new MoeflashError('INVALID_ARGUMENT', `the chat template (${this.chatTemplate.origin}) writes no tool calls this engine reads (Qwen's <tool_call> or gpt-oss's harmony): call chat() without tools`);
    }
    const forced = format ? forcedCall(format, offered!, toolChoice) : null;
    if (forced) prompt += forced.prefix;
    const inner = this.generate(this.tokenizer.encode(prompt, { addSpecialTokens: false }), forced ? { ...gen, responseFormat: forced.responseFormat } : gen);
    return chatStream(inner, format, forced?.prefix ?? '');
  }

  private grammars: GrammarCompiler | null = null;
  private tokenBytes: TokenTable | null = null;

  /** The engine's grammar compiler, made on the first constrained request. */
  private grammarCompiler(): GrammarCompiler {
    this.grammars ??= new GrammarCompiler(this.tokenizer, this.tokens(), [...this.stopIds]);
    return this.grammars;
  }

  private tokens(): TokenTable {
    this.tokenBytes ??= tokenTable(this.tokenizer, this.spec.vocabSize);
    return this.tokenBytes;
  }

  /** A token's GenerateChunk.logprobs entry, from its logits row or from the backend's numbers. */
  private tokenLogprob(token: number, from: RowLogprobs | { logits: Float32Array; row: number }, k: number): TokenLogprob {
    const V = this.spec.vocabSize;
    const lp = 'logits' in from ? rowLogprobs(from.logits, token, k, from.row * V, V) : from;
    const describe = (id: number, logprob: number): LogprobToken => ({
      token: id,
      text: this.tokenizer.decode([id]),
      bytes: [...(this.tokens().bytes[id] ?? [])],
      logprob,
    });
    return { ...describe(token, lp.logprob), top: lp.top.map((t) => describe(t.token, t.logprob)) };
  }

  private samplingDefaults(opts: GenerateOptions): SamplingParams {
    const g = this.generationConfig;
    const sampleByDefault = g.doSample === true;
    return {
      temperature: opts.temperature ?? (sampleByDefault ? (g.temperature ?? 1) : 0),
      topK: opts.topK ?? g.topK,
      topP: opts.topP ?? g.topP,
      minP: opts.minP ?? g.minP,
      seed: opts.seed ?? 0,
    };
  }

  /**
   * Stop taking requests, end the ones in flight, and free the model and its backend memory.
   * By default running requests fail with a CLOSED error; with `drain: true` they run to the end
   * first (and what is left after `timeoutMs`, when given, fails). Every KV page is released
   * before the model is disposed.
   */
  async close(opts: { drain?: boolean; timeoutMs?: number } = {}): Promise<void> {
    if (this.closed) return this.closing;
    this.closed = true;
    this.closing = this.shutdown(opts);
    return this.closing;
  }

  private closing: Promise<void> = Promise.resolve();

  private async shutdown(opts: { drain?: boolean; timeoutMs?: number }): Promise<void> {
    await this.scheduler.close(opts);
    await this.speculator?.dispose();
    await this.model.dispose();
    this.removeAllListeners();
  }
}

/**
 * Load a model folder and get an {@link Engine}.
 *
 * ```ts
 * const engine = await createEngine({ model: './models/moeflash-tiny-coder', backend: 'auto' });
 * for await (const chunk of engine.generate('def add(a, b):', { maxTokens: 32 })) process.stdout.write(chunk.text);
 * await engine.close();
 * ```
 */
export async function createEngine(opts: EngineOptions): Promise<Engine> {
  return Engine.create(opts);
}
