import type { IncomingMessage, Server, ServerResponse } from 'node:http';

export declare const DEFAULT_MAX_CONCURRENT: number;
export declare const DEFAULT_HEADER_TIMEOUT_MS: number;
export declare const DEFAULT_IDLE_TIMEOUT_MS: number;
/** A check of the client's API key in constant time; throws a 401 ApiError. No key: every request passes. */
export declare function apiKeyCheck(apiKey: string | undefined): (req: IncomingMessage) => void;
export declare class ConcurrencyGate {
  constructor(limit: number);
  readonly limit: number;
  readonly active: number;
  /** Takes a slot until `res` closes, or throws a 429 ApiError. */
  enter(res: ServerResponse): void;
}
export declare function applyTimeouts(server: Server, opts?: { headerTimeoutMs?: number; idleTimeoutMs?: number }): void;
export declare function holdOpen(req: IncomingMessage): void;
export declare function isLoopback(host: string): boolean;
