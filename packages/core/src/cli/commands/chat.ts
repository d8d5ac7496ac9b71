import readline from 'node:readline/promises';
import { createEngine } from '../../engine/engine.js';
import type { BackendChoice } from '../../backends/registry.js';
import type { ChatMessage } from '../../tokenizer/chat.js';
import { num, parse, required } from '../args.js';
import { progressBar } from '../progress.js';

export const chatHelp = `moeflash chat --model DIR [--backend auto|cpu|cuda] [--system TEXT] [--max-tokens N] [--temperature T] [--seed S]
  Interactive chat with the model's chat template. Ctrl-C stops a reply; Ctrl-D or /exit quits.
  --skip-finite-check  do not scan the weights for NaN and infinite values at load`;

export async function chat(argv: string[]): Promise<void> {
  const { values: v } = parse('chat', argv, {
    model: { type: 'string' }, backend: { type: 'string' }, system: { type: 'string' },
    'max-tokens': { type: 'string' }, temperature: { type: 'string' }, seed: { type: 'string' },
    'skip-finite-check': { type: 'boolean' },
  });
  if (v.help) return void console.log(chatHelp);
  const engine = await createEngine({
    model: required('chat', 'model', v.model),
    backend: (v.backend ?? 'auto') as BackendChoice,
    on: { 'load:progress': progressBar() },
    checkFiniteWeights: !v['skip-finite-check'],
  });
  const rl = readline.createInterface({ input: process.stdin, output: process.stdout });
  const messages: ChatMessage[] = v.system ? [{ role: 'system', content: v.system }] : [];
  let reply: AbortController | null = null;
  rl.on('SIGINT', () => (reply ? reply.abort() : rl.close()));
  try {
    for (;;) {
      let line: string;
      try {
        line = await rl.question('> ');
      } catch {
        break; // input closed
      }
      if (line.trim() === '/exit') break;
      messages.push({ role: 'user', content: line });
      reply = new AbortController();
      const stream = engine.chat(messages, {
        maxTokens: num('chat', 'max-tokens', v['max-tokens'], 256),
        temperature: num('chat', 'temperature', v.temperature),
        seed: num('chat', 'seed', v.seed),
        signal: reply.signal,
      });
      for await (const c of stream) process.stdout.write(c.text);
      process.stdout.write('\n');
      messages.push({ role: 'assistant', content: (await stream.result).text });
      reply = null;
    }
  } finally {
    rl.close();
    await engine.close();
  }
}
