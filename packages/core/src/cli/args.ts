import { parseArgs, type ParseArgsConfig } from 'node:util';
import { MoeflashError } from '../errors.js';

type Options = NonNullable<ParseArgsConfig['options']>;

/** parseArgs with errors that name the command and point at --help. */
export function parse<O extends Options>(command: string, argv: string[], options: O): { values: Record<string, any> } {
  try {
    return parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: false, strict: true });
  } catch (e) {
    throw new MoeflashError('INVALID_ARGUMENT', `moeflash ${command}: ${(e as Error).message}; see \`moeflash ${command} --help\``);
  }
}

/** The help line of the CLI's NaN scan, on in every command that loads weights. */
export const FINITE_CHECK_HELP = '--skip-finite-check  do not scan the weights for NaN and infinite values at load';

export function num(command: string, name: string, v: string | undefined, fallback?: number): number | undefined {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new MoeflashError('INVALID_ARGUMENT', `moeflash ${command}: --${name} must be a number, got '${v}'`);
  return n;
}

export function required(command: string, name: string, v: string | undefined): string {
  if (!v) throw new MoeflashError('INVALID_ARGUMENT', `moeflash ${command}: --${name} is required; see \`moeflash ${command} --help\``);
  return v;
}
