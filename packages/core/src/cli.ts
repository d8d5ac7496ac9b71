#!/usr/bin/env node
import { MoeflashError } from './errors.js';
import { chat, chatHelp } from './cli/commands/chat.js';
import { info, infoHelp } from './cli/commands/info.js';
import { logits, logitsHelp } from './cli/commands/logits.js';
import { run, runHelp } from './cli/commands/run.js';
import { synth, synthHelp } from './cli/commands/synth.js';

const commands: Record<string, { fn: (argv: string[]) => Promise<void>; help: string }> = {
  run: { fn: run, help: runHelp },
  chat: { fn: chat, help: chatHelp },
  info: { fn: info, help: infoHelp },
  logits: { fn: logits, help: logitsHelp },
  synth: { fn: synth, help: synthHelp },
};

export function usage(): string {
  return `moeflash <command> [options]\n\ncommands:\n${Object.entries(commands)
    .map(([name, c]) => `  ${name.padEnd(8)} ${c.help.split('\n')[1]?.trim() ?? ''}`)
    .join('\n')}\n\nmoeflash <command> --help for its options`;
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    console.log(usage());
    return 0;
  }
  const cmd = commands[name];
  if (!cmd) {
    console.error(`moeflash: unknown command '${name}'\n\n${usage()}`);
    return 2;
  }
  try {
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
