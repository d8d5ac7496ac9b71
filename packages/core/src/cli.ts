#!/usr/bin/env node
import { MoeflashError } from './errors.js';
import { importOptional } from './backends/registry.js';
import { bench, benchHelp } from './cli/commands/bench.js';
import { chat, chatHelp } from './cli/commands/chat.js';
import { info, infoHelp } from './cli/commands/info.js';
import { logits, logitsHelp } from './cli/commands/logits.js';
import { routeDiff, routeDiffHelp } from './cli/commands/route-diff.js';
import { run, runHelp } from './cli/commands/run.js';
import { synth, synthHelp } from './cli/commands/synth.js';

const commands: Record<string, { fn: (argv: string[]) => Promise<void>; help: string }> = {
  run: { fn: run, help: runHelp },
  chat: { fn: chat, help: chatHelp },
  info: { fn: info, help: infoHelp },
  logits: { fn: logits, help: logitsHelp },
  synth: { fn: synth, help: synthHelp },
  bench: { fn: bench, help: benchHelp },
  'route-diff': { fn: routeDiff, help: routeDiffHelp },
};

export function usage(): string {
  return `moeflash <command> [options]\n\ncommands:\n${Object.entries(commands)
    .map(([name, c]) => `  ${name.padEnd(8)} ${c.help.split('\n')[1]?.trim() ?? ''}`)
    .join('\n')}\n  quantize Convert a checkpoint: MXFP4 experts, FP8 or bf16 dense weights (@moeflash/quant).\n  quant-report Quality of a quantized checkpoint against its reference (@moeflash/quant).\n\nmoeflash <command> --help for its options`;
}

/** Commands that live in optional packages (e.g. quantize and quant-report in @moeflash/quant). */
const OPTIONAL_COMMANDS: Record<string, string> = {
  quantize: '@moeflash/quant',
  'quant-report': '@moeflash/quant',
};

async function optionalCommand(name: string): Promise<(typeof commands)[string] | undefined> {
  const pkg = OPTIONAL_COMMANDS[name];
  if (!pkg) return undefined;
  const mod = await importOptional<{ cliCommands?: typeof commands }>(pkg);
  if (typeof mod === 'string') throw new MoeflashError('BACKEND_UNAVAILABLE', `\`moeflash ${name}\` needs ${mod}`);
  return mod.cliCommands?.[name];
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    console.log(usage());
    return 0;
  }
  try {
    const cmd = commands[name] ?? (await optionalCommand(name));
    if (!cmd) {
      console.error(`moeflash: unknown command '${name}'\n\n${usage()}`);
      return 2;
    }
    await cmd.fn(rest);
    return 0;
  } catch (e) {
    if (e instanceof MoeflashError) {
      console.error(`moeflash ${name}: ${e.message}`);
      return 1;
    }
    throw e;
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
