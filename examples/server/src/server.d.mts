import type { Server } from 'node:http';
import type { BackendChoice, ChatMessage, Engine, EngineOptions, GenerateOptions, KvCacheOptions } from '@moeflash/core';

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
  log?: (line: string) => void;
}

export interface StartOptions extends Omit<ServerOptions, 'engine'> {
  model: string;
  backend?: BackendChoice;
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
  options: GenerateOptions & { maxTokens: number };
}

export declare function parseChatRequest(body: unknown, limits: ServerLimits): ParsedCommon & { messages: ChatMessage[]; tools?: unknown[] };
export declare function parseCompletionRequest(body: unknown, limits: ServerLimits): ParsedCommon & { prompt: string | number[] };
export declare function toApiError(e: unknown): ApiError;
export declare function createServer(opts: ServerOptions): Server;
export declare function startServer(opts: StartOptions): Promise<RunningServer>;
