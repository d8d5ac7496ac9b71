// Runs one conversion from the built package in a process of its own, so that a test can bound
// its heap (--max-old-space-size) and read its peak memory. Prints one JSON line on stdout.
//   node --max-old-space-size=64 convert-child.mjs IN OUT [dense]
import { convertCheckpoint } from '../dist/index.js';

const [input, output, dense = 'bf16'] = process.argv.slice(2);
const before = process.resourceUsage().maxRSS * 1024;
let peakHeap = 0;
const res = await convertCheckpoint({
  input,
  output,
  dense,
  onProgress: () => {
    const h = process.memoryUsage().heapUsed;
    if (h > peakHeap) peakHeap = h;
  },
});
console.log(JSON.stringify({
  inputBytes: res.inputBytes,
  outputBytes: res.outputBytes,
  seconds: res.seconds,
  rssBeforeBytes: before,
  maxRssBytes: process.resourceUsage().maxRSS * 1024,
  peakHeapBytes: peakHeap,
}));
