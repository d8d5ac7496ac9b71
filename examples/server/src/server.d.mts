import type { Server } from 'node:http';
import type { BackendChoice, ChatMessage, Engine, EngineOptions, GenerateOptions, KvCacheOptions, ToolChoice, ToolDefinition } from '@moeflash/core';

/** What validation needs to know about the served model. */
export interface ServerLimits {
  modelId: string;
  /** Largest max_tokens accepted. */
  maxTokensLimit: number;
  /** max_tokens when the request leaves it out. */
  defaultMaxTokens: number;
  vocabSize: number;
}

export interface ServerOptions {
  engine: Engine;
  /** The id clients pass as `model` (default 'moeflash'; startServer uses the folder name). */
  modelId?: string;
  /** Largest request body in bytes (default 1 MiB); more is answered with 413. */
  bodyLimit?: number;
  /** Largest max_tokens accepted (default: the model's context). */
  maxTokensLimit?: number;
  /** max_tokens when a request leaves it out (default: generation_config.json, else 256). */
  defaultMaxTokens?: number;
  /**
   * Requests must send `Authorization: Bearer <apiKey>` (or `x-api-key`); compared in constant
   * time. `GET /health` stays open. Default: no key.
   */
  apiKey?: string;
  /** Most requests generating at once; more get a 429 at once (default 256). */
  maxConcurrentRequests?: number;
  /** Time a client has to send its request headers, in ms (default 10 000; then 408). */
  headerTimeoutMs?: number;
  /**
   * Time a connection may be silent, in ms (default 30 000): while it sends a request, between
   * requests, or while it does not read a stream (then its request is aborted and freed).
   */
  idleTimeoutMs?: number;
  log?: (line: string) => void;
}

export interface StartOptions extends Omit<ServerOptions, 'engine'> {
  model: string;
  backend?: BackendChoice;
  /** Address to listen on (default 127.0.0.1: this machine only; anything else logs a warning without apiKey). */
  host?: string;
  /** 0 picks a free port. */
  port?: number;
  maxBatch?: number;
  maxStepTokens?: number;
  kvCache?: KvCacheOptions;
  speculative?: EngineOptions['speculative'];
}

export interface RunningServer {
  server: Server;
  engine: Engine;
  modelId: string;
  /** http://host:port (the API is under /v1). */
  url: string;
  close(opts?: { timeoutMs?: number }): Promise<void>;
}

export declare const DEFAULT_BODY_LIMIT: number;

export declare class ApiError extends Error {
  constructor(status: number, message: string, opts?: { type?: string; param?: string | null; code?: string | null });
  readonly status: number;
  readonly type: string;
  readonly param: string | null;
  readonly code: string | null;
  toJSON(): { error: { message: string; type: string; param: string | null; code: string | null } };
}

export interface ParsedCommon {
  stream: boolean;
  includeUsage: boolean;
  /** Sampling and limits, plus `responseFormat` and `logprobs` / `topLogprobs` when asked for. */
  options: GenerateOptions & { maxTokens: number };
}

export declare function parseChatRequest(body: unknown, limits: ServerLimits): ParsedCommon & { messages: ChatMessage[]; tools?: ToolDefinition[]; toolChoice?: ToolChoice };
export declare function parseCompletionRequest(body: unknown, limits: ServerLimits): ParsedCommon & { prompt: string | number[] };
export declare function toApiError(e: unknown): ApiError;
export declare function createServer(opts: ServerOptions): Server;
/** Server-sent events onto `res` with back-pressure; a reader that takes nothing for `idleMs` is cut off (res.destroy()). */
export declare function sseWriter(res: import('node:http').ServerResponse, idleMs: number): (event: unknown) => Promise<void>;
export declare function startServer(opts: StartOptions): Promise<RunningServer>;
