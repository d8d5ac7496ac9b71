import { EventEmitter } from 'eventemitter3';
import path from 'node:path';
import type { Backend, LoadedModel, LoadProgress } from '../backends/backend.js';
import { importOptional, type BackendChoice } from '../backends/registry.js';
import { MoeflashError } from '../errors.js';
import type { ModelSpec } from '../model/spec.js';
import { argmax, sampleToken, validateSamplingParams, type SamplingParams } from '../sampling/sample.js';
import { ChatTemplate, type ChatMessage } from '../tokenizer/chat.js';
import { loadGenerationConfig, stopTokenIds, type GenerationConfig } from '../tokenizer/generation-config.js';
import { loadTokenizer, StreamDecoder, type TextTokenizer } from '../tokenizer/tokenizer.js';
import { loadModel } from './load.js';
import { ChunkStream } from './chunk-stream.js';
import { Scheduler } from './scheduler.js';
import type { Proposal, SpeculationContext, SpeculationStats, Speculator, SpeculatorFactoryInput } from './speculation.js';
import { StopStringFilter } from './stop-strings.js';

export interface EngineOptions {
  /** Folder of an HF model: config.json, safetensors, tokenizer files. */
  model: string;
  /** Where to run: `auto` (CUDA when usable, else CPU), `cpu`, `cuda`, or a Backend object. */
  backend?: BackendChoice;
  /** Most sequences decoded together in one step (default 16). */
  maxBatch?: number;
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
  /** Most new tokens (default: generation_config.json's max_new_tokens, else 256). */
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
}

/** One streamed piece of output. */
export interface GenerateChunk {
  /** Text added since the last chunk (may be empty while a multi-byte character completes). */
  text: string;
  /** New token ids. */
  tokens: number[];
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
  /** Speculative decoding statistics, when the engine speculates. */
  speculation?: SpeculationStats;
}

/** The stream `generate()` returns: iterate it for chunks; `result` settles when it ends. */
export interface GenerateStream extends AsyncIterable<GenerateChunk> {
  readonly result: Promise<GenerateResult>;
}

export interface EngineEvents {
  'load:progress': (p: LoadProgress) => void;
  'load:done': (info: { ms: number; backend: string; memory: ReturnType<LoadedModel['memory']> }) => void;
  step: (info: { sequences: number; tokens: number; ms: number }) => void;
  'request:done': (r: GenerateResult) => void;
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
    engine.scheduler = new Scheduler(model, {
      maxBatch: opts.maxBatch ?? 16,
      onStep: (info) => engine.emit('step', info),
    });
    engine.emit('load:done', { ms: handle.loadMs, backend: handle.backend.name, memory: model.memory() });
    return engine;
  }

  /** The model on its backend (for tools that drive steps themselves, such as `moeflash logits`). */
  model!: LoadedModel;
  private stopIds = new Set<number>();
  /** The speculative method, when EngineOptions.speculative set one. */
  speculator: Speculator | null = null;

  /** Generate from a prompt string (tokenized as is) or from token ids. */
  generate(prompt: string | number[], opts: GenerateOptions = {}): GenerateStream {
    if (this.closed) throw new MoeflashError('CLOSED', 'the engine is closed; create a new one');
    const params = this.samplingDefaults(opts);
    validateSamplingParams(params);
    const ids = typeof prompt === 'string' ? this.tokenizer.encode(prompt) : [...prompt];
    if (ids.length === 0) throw new MoeflashError('INVALID_ARGUMENT', 'the prompt is empty: give at least one token');
    const maxTokens = opts.maxTokens ?? this.generationConfig.maxNewTokens ?? 256;
    if (!Number.isInteger(maxTokens) || maxTokens < 0) {
      throw new MoeflashError('INVALID_ARGUMENT', `maxTokens must be a non-negative integer, got ${maxTokens}`);
    }
    const stopIds = new Set([...(opts.ignoreEos ? [] : this.stopIds), ...(opts.stopTokenIds ?? [])]);
    const stream = new ChunkStream<GenerateChunk>();
    const decoder = new StreamDecoder(this.tokenizer);
    const stops = new StopStringFilter(opts.stop ?? []);
    const generated: number[] = [];
    let text = '';
    let finishReason: FinishReason = 'length';
    const t0 = performance.now();
    let tFirst = 0;
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
    const aborted = () => opts.signal?.aborted === true;

    let settled = false;
    let speculation: SpeculationStats | undefined;
    const finish = () => {
      if (settled) return;
      settled = true;
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
        speculation,
      };
      resolveResult(r);
      this.emit('request:done', r);
    };

    if (maxTokens === 0) {
      queueMicrotask(finish);
      return { [Symbol.asyncIterator]: () => stream[Symbol.asyncIterator](), result };
    }

    const V = this.spec.vocabSize;
    const speculator = opts.speculative === false ? null : this.speculator?.forRequest(opts.speculative ?? {}) ?? null;
    const ctx = (cacheLength: number): SpeculationContext => ({
      tokens: [...ids, ...generated],
      cacheLength,
      params,
      stream: opts.stream ?? 0,
    });
    let pending = ids;
    let prefilled = false;
    let proposal: Proposal | null = null;
    let lengthBefore = 0;

    /** Emit tokens in order until one ends the request; true while it goes on. */
    const accept = (tokens: number[]): boolean => {
      for (const token of tokens) {
        if (!tFirst) tFirst = performance.now();
        if (stopIds.has(token)) {
          finishReason = 'stop';
          return false;
        }
        generated.push(token);
        const delta = stops.push(decoder.push([token]));
        emit({ text: delta, tokens: [token] });
        if (stops.stopped) {
          finishReason = 'stop';
          return false;
        }
        if (generated.length >= maxTokens) return false;
      }
      pending = [tokens[tokens.length - 1]];
      return true;
    };

    this.scheduler.submit({
      cancelled: aborted,
      fail: (e) => {
        if (settled) return;
        settled = true;
        speculator?.release();
        stream.fail(e);
        rejectResult(e);
      },
      finished: () => {
        if (speculator) speculation = speculator.stats();
        speculator?.release();
        finish();
      },
      prepare: speculator
        ? async (seq) => {
            proposal = null;
            if (!prefilled) return;
            lengthBefore = seq.length;
            const room = maxTokens - generated.length - 1;
            proposal = await speculator.propose(ctx(lengthBefore));
            if (proposal.tokens.length > room) proposal.tokens = proposal.tokens.slice(0, Math.max(0, room));
            pending = [pending[0], ...proposal.tokens];
          }
        : undefined,
      work: () => ({
        tokens: pending,
        logits: proposal ? 'all' : 'last',
        hiddenLayers: speculator?.hiddenLayers.length ? speculator.hiddenLayers : undefined,
      }),
      advance: (out, seq) => {
        if (speculator && !prefilled) {
          prefilled = true;
          void speculator.prefilled(ctx(seq.length), out);
        }
        prefilled = true;
        if (speculator && proposal) {
          const verdict = speculator.verify(ctx(lengthBefore), proposal, out);
          seq.truncate(lengthBefore + 1 + verdict.accepted);
          return accept(verdict.emit);
        }
        const logits = out.logits.subarray((out.rows - 1) * V, out.rows * V);
        const token =
          params.temperature === 0
            ? argmax(logits)
            : sampleToken(logits, params, { seed: params.seed ?? 0, seq: opts.stream ?? 0, position: seq.length });
        return accept([token]);
      },
    });
    return { [Symbol.asyncIterator]: () => stream[Symbol.asyncIterator](), result };
  }

  /** Apply the model's chat template to `messages` and generate the assistant's reply. */
  chat(messages: ChatMessage[], opts: GenerateOptions & { tools?: unknown[] } = {}): GenerateStream {
    if (!this.chatTemplate) {
      throw new MoeflashError('TOKENIZER_INVALID', `the model in ${this.dir} has no chat template (tokenizer_config.json chat_template or chat_template.jinja); use generate() with a prompt instead`);
    }
    const prompt = this.chatTemplate.apply(messages, { addGenerationPrompt: true, tools: opts.tools });
    return this.generate(this.tokenizer.encode(prompt, { addSpecialTokens: false }), opts);
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

  /** Cancel running requests and free the model and its backend memory. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.scheduler.close();
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
