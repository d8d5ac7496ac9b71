import { createEngine, type EngineOptions } from '../../engine/engine.js';
import { MoeflashError } from '../../errors.js';
import type { BackendChoice } from '../../backends/registry.js';
import { num, parse, required } from '../args.js';
import { progressBar } from '../progress.js';

export const runHelp = `moeflash run --model DIR --prompt TEXT [options]
  Stream a completion of TEXT.
  --backend auto|cpu|cuda   (default auto)
  --max-tokens N            (default 128)
  --temperature T --top-k K --top-p P --min-p P --seed S
  --stop STR                stop string (repeatable)
  --chat                    wrap the prompt as one user message with the chat template
  --speculative METHOD      dflash (with --draft DIR) or prompt-lookup
  --draft DIR               DFlash draft model folder
  --block-size B            drafted tokens a round (default 8, at most 16)
  --adaptive                let the block-size policy pick B in 0..block-size each round from the
                            measured costs and acceptance (0: a plain step, when drafting does not pay)
  --stats                   print tokens/s and timings at the end; with --speculative also decode
                            the same prompt plainly and print both speeds
  --skip-finite-check       do not scan the weights for NaN and infinite values at load`;

export function speculativeOption(v: Record<string, any>): EngineOptions['speculative'] {
  const method = v.speculative ?? (v.draft ? 'dflash' : undefined);
  if (!method) return undefined;
  const blockSize = num('run', 'block-size', v['block-size']);
  const adaptive = v.adaptive === true ? true : undefined;
  if (method === 'dflash') return { method, draft: required('run', 'draft', v.draft), blockSize, adaptive };
  if (method === 'prompt-lookup') return { method, blockSize, adaptive };
  throw new MoeflashError('INVALID_ARGUMENT', `--speculative must be dflash or prompt-lookup, got '${method}'`);
}

export async function run(argv: string[]): Promise<void> {
  const { values: v } = parse('run', argv, {
    model: { type: 'string' }, prompt: { type: 'string' }, backend: { type: 'string' },
    'max-tokens': { type: 'string' }, temperature: { type: 'string' }, 'top-k': { type: 'string' },
    'top-p': { type: 'string' }, 'min-p': { type: 'string' }, seed: { type: 'string' },
    stop: { type: 'string', multiple: true }, chat: { type: 'boolean' }, stats: { type: 'boolean' },
    speculative: { type: 'string' }, draft: { type: 'string' }, 'block-size': { type: 'string' },
    adaptive: { type: 'boolean' }, 'skip-finite-check': { type: 'boolean' },
  });
  if (v.help) return void console.log(runHelp);
  const engine = await createEngine({
    model: required('run', 'model', v.model),
    backend: (v.backend ?? 'auto') as BackendChoice,
    on: { 'load:progress': progressBar() },
    speculative: speculativeOption(v),
    // A corrupt checkpoint would otherwise load and print garbage (NaN logits sample token 0).
    checkFiniteWeights: !v['skip-finite-check'],
  });
  const controller = new AbortController();
  const onSigint = () => controller.abort();
  process.once('SIGINT', onSigint);
  try {
    const prompt = required('run', 'prompt', v.prompt);
    const opts = {
      maxTokens: num('run', 'max-tokens', v['max-tokens'], 128),
      temperature: num('run', 'temperature', v.temperature),
      topK: num('run', 'top-k', v['top-k']),
      topP: num('run', 'top-p', v['top-p']),
      minP: num('run', 'min-p', v['min-p']),
      seed: num('run', 'seed', v.seed),
      stop: v.stop,
      signal: controller.signal,
    };
    const stream = v.chat ? engine.chat([{ role: 'user', content: prompt }], opts) : engine.generate(prompt, opts);
    if (!v.chat) process.stdout.write(prompt);
    for await (const chunk of stream) process.stdout.write(chunk.text);
    process.stdout.write('\n');
    const r = await stream.result;
    if (v.stats) {
      if (r.speculation) {
        const s = r.speculation as typeof r.speculation & { roundsByBlockSize?: number[] };
        const byB = s.roundsByBlockSize?.map((n, b) => (n ? `B=${b}: ${n}` : '')).filter(Boolean).join(', ');
        console.error(
          `[${s.method}] block ${v.adaptive ? `up to ${s.blockSize}, adaptive` : s.blockSize}: ${s.rounds} rounds${byB ? ` (${byB})` : ''}, ${s.meanAcceptedPerRound.toFixed(2)} tokens a round (${s.acceptedTokens}/${s.draftedTokens} drafts accepted)`,
        );
        // The same prompt again without and with speculation, both warm, so that the speed-up
        // printed is one measured here and not the first run's start-up.
        const again = { ...opts, signal: undefined };
        const plain = await engine.generate(prompt, { ...again, speculative: false }).result;
        const spec = await engine.generate(prompt, again).result;
        console.error(
          `[${engine.backend.name}] measured again, warm: plain ${plain.tokensPerSecond.toFixed(1)} tokens/s, speculative ${spec.tokensPerSecond.toFixed(1)} tokens/s: ${(spec.tokensPerSecond / plain.tokensPerSecond).toFixed(2)}x`,
        );
      }
      console.error(
        `[${engine.backend.name}] ${r.tokens.length} tokens, ${r.tokensPerSecond.toFixed(1)} tokens/s, first token after ${(r.timeToFirstToken * 1000).toFixed(0)} ms (prompt ${r.promptTokens} tokens), finish: ${r.finishReason}`,
      );
    }
  } finally {
    process.off('SIGINT', onSigint);
    await engine.close();
  }
}
