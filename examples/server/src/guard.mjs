// What stands between the network and the engine: the API key, the cap on concurrent requests,
// and the timeouts that keep a silent or stalled client from holding a connection (and, for a
// stream, a batch slot and its KV pages) forever.
import { createHash, timingSafeEqual } from 'node:crypto';
import { isIP } from 'node:net';
import { ApiError } from './validate.mjs';

/** Default cap on requests generating at once (the 200-request load test fits under it). */
export const DEFAULT_MAX_CONCURRENT = 256;
/** Default time a client has to send its request headers. */
export const DEFAULT_HEADER_TIMEOUT_MS = 10_000;
/** Default time a connection may sit silent: between requests, while sending one, or not reading a stream. */
export const DEFAULT_IDLE_TIMEOUT_MS = 30_000;

const digest = (s) => createHash('sha256').update(s, 'utf8').digest();

/**
 * A check of the client's key (`Authorization: Bearer KEY`, as OpenAI clients send it, or
 * `x-api-key`). Both sides are hashed to 32 bytes first, so the comparison takes the same time
 * whatever the key's length and however much of it a guess gets right.
 * @param {string | undefined} apiKey no key: every request passes
 * @returns {(req: import('node:http').IncomingMessage) => void} throws a 401 ApiError
 */
export function apiKeyCheck(apiKey) {
  if (apiKey === undefined || apiKey === null) return () => {};
  if (typeof apiKey !== 'string' || apiKey.length === 0) throw new TypeError('apiKey must be a non-empty string');
  const want = digest(apiKey);
  return (req) => {
    const auth = req.headers.authorization;
    const bearer = typeof auth === 'string' ? /^Bearer\s+(.+)$/i.exec(auth.trim()) : null;
    const given = bearer ? bearer[1] : typeof req.headers['x-api-key'] === 'string' ? req.headers['x-api-key'] : null;
    // Hash even a missing key, so that no branch depends on what was sent.
    const ok = timingSafeEqual(digest(given ?? ''), want);
    if (!ok || given === null) {
      throw new ApiError(401, given === null ? 'no API key given: send "Authorization: Bearer <key>"' : 'incorrect API key', { code: 'invalid_api_key' });
    }
  };
}

/**
 * Counts requests that generate; past `limit` a request is answered 429 at once instead of
 * queueing without bound (each queued request holds a connection and, once admitted, KV pages).
 */
export class ConcurrencyGate {
  /** @param {number} limit */
  constructor(limit) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new TypeError(`maxConcurrentRequests must be a positive integer, got ${limit}`);
    this.limit = limit;
    this.active = 0;
  }

  /** Takes a slot until `res` closes, or throws a 429 ApiError. */
  enter(res) {
    if (this.active >= this.limit) {
      throw new ApiError(429, `the server is running ${this.active} requests, its limit (--max-concurrent ${this.limit}); retry later`, {
        type: 'rate_limit_exceeded',
        code: 'rate_limit_exceeded',
      });
    }
    this.active++;
    res.once('close', () => this.active--);
  }
}

/**
 * Header timeout: the whole header block must arrive within `headerTimeoutMs` (Node answers 408
 * and closes). Idle timeout: a connection with no traffic for `idleTimeoutMs` while it sends a
 * request, or between requests on a kept-alive connection, is closed; a request that is
 * generating turns it off for its socket ({@link holdOpen}), since a long non-streamed answer is
 * silent until it is done.
 * @param {import('node:http').Server} server
 */
export function applyTimeouts(server, { headerTimeoutMs = DEFAULT_HEADER_TIMEOUT_MS, idleTimeoutMs = DEFAULT_IDLE_TIMEOUT_MS } = {}) {
  for (const [name, v] of [['headerTimeoutMs', headerTimeoutMs], ['idleTimeoutMs', idleTimeoutMs]]) {
    if (!Number.isSafeInteger(v) || v < 1) throw new TypeError(`${name} must be a positive integer of milliseconds, got ${v}`);
  }
  server.headersTimeout = headerTimeoutMs;
  // Node refuses a request timeout below the header timeout; the body's own pace is bounded by the idle timeout.
  server.requestTimeout = Math.max(server.requestTimeout, headerTimeoutMs);
  server.keepAliveTimeout = idleTimeoutMs;
  server.timeout = idleTimeoutMs;
}

/**
 * A generating request's socket: no inactivity timeout until the response is done (Node then puts
 * the keep-alive timeout on a kept-alive socket itself). A stream's stalled reader is caught by
 * the writer instead, which knows the difference between "computing" and "not reading".
 */
export function holdOpen(req) {
  req.socket.setTimeout(0);
}

/** Whether `host` only accepts connections from this machine. */
export function isLoopback(host) {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1' || host === '::ffff:127.0.0.1';
}
