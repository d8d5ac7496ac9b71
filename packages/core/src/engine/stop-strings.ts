/**
 * Streams text while watching for stop strings: text that might be the start of a stop string is
 * held back until it is clear either way, so a stop string never reaches the caller.
 */
export class StopStringFilter {
  private pending = '';
  stopped = false;

  constructor(private readonly stops: string[]) {}

  /** Feed a text delta; returns what may be emitted now. Sets `stopped` when a stop string completes. */
  push(delta: string): string {
    if (this.stopped) return '';
    this.pending += delta;
    if (this.stops.length === 0) {
      const out = this.pending;
      this.pending = '';
      return out;
    }
    let cut = -1;
    for (const s of this.stops) {
      const i = this.pending.indexOf(s);
      if (i !== -1 && (cut === -1 || i < cut)) cut = i;
    }
    if (cut !== -1) {
      this.stopped = true;
      const out = this.pending.slice(0, cut);
      this.pending = '';
      return out;
    }
    // Hold back the longest suffix that is a proper prefix of some stop string.
    let hold = 0;
    for (const s of this.stops) {
      for (let k = Math.min(s.length - 1, this.pending.length); k > hold; k--) {
        if (this.pending.endsWith(s.slice(0, k))) {
          hold = k;
          break;
        }
      }
    }
    const out = this.pending.slice(0, this.pending.length - hold);
    this.pending = this.pending.slice(this.pending.length - hold);
    return out;
  }

  /** At the end of generation, whatever was held back is real text. */
  flush(): string {
    const out = this.stopped ? '' : this.pending;
    this.pending = '';
    return out;
  }
}
