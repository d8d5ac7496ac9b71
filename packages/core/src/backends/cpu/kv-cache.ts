/** One sequence's keys and values on the CPU: per layer, rows of numKvHeads * headDim float32. */
export class CpuKvCache {
  length = 0;
  private capacity = 0;
  keys: Float32Array[];
  values: Float32Array[];

  constructor(readonly numLayers: number, readonly rowSize: number) {
    this.keys = Array.from({ length: numLayers }, () => new Float32Array(0));
    this.values = Array.from({ length: numLayers }, () => new Float32Array(0));
  }

  /** Make room for `n` rows; growing doubles so appends are amortized O(1). */
  reserve(n: number): void {
    if (n <= this.capacity) return;
    const cap = Math.max(n, this.capacity * 2, 16);
    for (let l = 0; l < this.numLayers; l++) {
      const k = new Float32Array(cap * this.rowSize);
      k.set(this.keys[l].subarray(0, this.length * this.rowSize));
      const v = new Float32Array(cap * this.rowSize);
      v.set(this.values[l].subarray(0, this.length * this.rowSize));
      this.keys[l] = k;
      this.values[l] = v;
    }
    this.capacity = cap;
  }

  bytes(): number {
    return 2 * this.numLayers * this.capacity * this.rowSize * 4;
  }
}
