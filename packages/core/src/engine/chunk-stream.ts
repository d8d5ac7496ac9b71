/**
 * A single-consumer async queue: the scheduler pushes, one `for await` pulls.
 *
 * Back-pressure: once a consumer has started iterating, `full()` turns true when `highWaterMark`
 * items wait unread, and the scheduler pauses the request instead of buffering without bound;
 * `onPull` fires when the consumer takes an item from a full buffer (or stops), so the scheduler can resume it. A stream nobody
 * iterates (a caller that only awaits the result) is never full: its items are kept for a late
 * iterator, and its text is kept for the result anyway.
 */
export class ChunkStream<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private waiting: ((r: IteratorResult<T>) => void) | null = null;
  private failWaiting: ((e: unknown) => void) | null = null;
  private done = false;
  private error: unknown = null;
  private iterating = false;
  /** The consumer stopped early (break out of `for await`). */
  abandoned = false;

  constructor(private readonly opts: { highWaterMark?: number; onPull?: () => void } = {}) {}

  /** True while a consumer lags `highWaterMark` items behind. */
  full(): boolean {
    return this.iterating && !this.done && this.items.length >= (this.opts.highWaterMark ?? Infinity);
  }

  push(item: T): void {
    if (this.done) return;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = this.failWaiting = null;
      w({ value: item, done: false });
    } else this.items.push(item);
  }

  end(): void {
    this.done = true;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = this.failWaiting = null;
      w({ value: undefined as never, done: true });
    }
  }

  fail(e: unknown): void {
    if (this.done) return;
    this.error = e;
    this.done = true;
    if (this.failWaiting) {
      const f = this.failWaiting;
      this.waiting = this.failWaiting = null;
      f(e);
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    this.iterating = true;
    return {
      next: () => {
        if (this.items.length) {
          const wasFull = this.full();
          const value = this.items.shift()!;
          if (wasFull) this.opts.onPull?.();
          return Promise.resolve({ value, done: false });
        }
        if (this.error) return Promise.reject(this.error);
        if (this.done) return Promise.resolve({ value: undefined as never, done: true });
        return new Promise((resolve, reject) => {
          this.waiting = resolve;
          this.failWaiting = reject;
        });
      },
      return: () => {
        if (!this.done) this.abandoned = true;
        this.done = true;
        this.items.length = 0;
        this.opts.onPull?.();
        return Promise.resolve({ value: undefined as never, done: true });
      },
    };
  }
}
