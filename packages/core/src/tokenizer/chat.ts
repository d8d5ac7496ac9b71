import { join } from 'node:path';
import { Environment, Interpreter, Template } from '@huggingface/jinja';
import { MoeflashError } from '../errors.js';
import { describe, isPlainObject, readOptionalJsonObject, readOptionalText, tokenContent } from './files.js';

/**
 * One chat turn. `content` is usually a string; templates of multimodal or tool-using models also
 * read other fields (`tool_calls`, `reasoning_content`, content parts), so those pass through.
 */
export interface ChatMessage {
  role: string;
  content?: unknown;
  [field: string]: unknown;
}

export interface ChatTemplateOptions {
  /** Append the header that opens the assistant's turn. Default true. */
  addGenerationPrompt?: boolean;
  /** Tool (function) definitions as JSON schemas, exposed to the template as `tools`. */
  tools?: readonly unknown[] | null;
  /**
   * More template variables (`enable_thinking`, `reasoning_effort`, ...). They override the
   * special-token variables but not `messages`, `tools` or `add_generation_prompt`.
   */
  extra?: Record<string, unknown>;
  /** Which named template to use when the model ships several. */
  templateName?: string;
  /** Clock for `strftime_now`; fixed in tests so renders are reproducible. */
  now?: () => Date;
}

/** Special tokens that transformers exposes to chat templates by name. */
export interface ChatSpecialTokens {
  bos_token?: string;
  eos_token?: string;
  unk_token?: string;
  pad_token?: string;
  sep_token?: string;
  cls_token?: string;
  mask_token?: string;
  additional_special_tokens?: string[];
}

/** The globals Jinja and transformers give every template, besides the functions set per render. */
const JINJA_GLOBALS: Record<string, unknown> = {
  true: true,
  false: false,
  none: null,
  True: true,
  False: false,
  None: null,
  range: (start: number, stop?: number, step = 1): number[] => {
    if (stop === undefined) [start, stop] = [0, start];
    if (step === 0) throw new Error('range() step must not be zero');
    const out: number[] = [];
    for (let i = start; step > 0 ? i < stop : i > stop; i += step) out.push(i);
    return out;
  },
};

const SPECIAL_TOKEN_KEYS = [
  'bos_token',
  'eos_token',
  'unk_token',
  'pad_token',
  'sep_token',
  'cls_token',
  'mask_token',
] as const;

/** Reads the special-token names a chat template may refer to out of tokenizer_config.json. */
export function chatSpecialTokens(tokenizerConfig: Record<string, unknown>): ChatSpecialTokens {
  const out: ChatSpecialTokens = {};
  for (const key of SPECIAL_TOKEN_KEYS) {
    const content = tokenContent(tokenizerConfig[key]);
    if (content !== undefined) out[key] = content;
  }
  const extra = tokenizerConfig.additional_special_tokens;
  if (Array.isArray(extra)) {
    const names = extra.map(tokenContent).filter((s): s is string => s !== undefined);
    if (names.length > 0) out.additional_special_tokens = names;
  }
  return out;
}

/**
 * A model's chat template, rendered the way transformers' `apply_chat_template` renders it
 * (blocks trimmed and left-stripped, the same variables and helper functions).
 */
export class ChatTemplate {
  /** Names of the available templates; a single unnamed template is called "default". */
  readonly names: readonly string[];
  private readonly sources: ReadonlyMap<string, string>;
  private readonly compiled = new Map<string, Template>();

  constructor(
    templates: string | Readonly<Record<string, string>>,
    readonly specialTokens: ChatSpecialTokens = {},
    /** Where the template came from, for error messages. */
    readonly origin = 'chat template',
  ) {
    const entries = typeof templates === 'string' ? [['default', templates] as const] : Object.entries(templates);
    if (entries.length === 0) {
      throw new MoeflashError('TOKENIZER_INVALID', `${origin} holds no templates`);
    }
    for (const [name, source] of entries) {
      if (typeof source !== 'string') {
        throw new MoeflashError('TOKENIZER_INVALID', `${origin}: template "${name}" is not a string`);
      }
    }
    this.sources = new Map(entries);
    this.names = [...this.sources.keys()];
  }

  /**
   * The chat template of a model folder (see {@link loadChatTemplate}), or null when it has none.
   * A tokenizer from `loadTokenizer` already carries it as `chatTemplate`.
   */
  static async load(dir: string): Promise<ChatTemplate | null> {
    const config = await readOptionalJsonObject(join(dir, 'tokenizer_config.json'), 'TOKENIZER_INVALID');
    return loadChatTemplate(dir, config ?? {});
  }

  /** The template text that `apply` would use with these options. */
  source(options: Pick<ChatTemplateOptions, 'templateName' | 'tools'> = {}): string {
    return this.sources.get(this.pick(options))!;
  }

  apply(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
    validateMessages(messages);
    const name = this.pick(options);
    const template = this.compile(name);
    const now = options.now ?? (() => new Date());
    const context: Record<string, unknown> = {
      ...JINJA_GLOBALS,
      ...this.specialTokens,
      ...options.extra,
      messages,
      // transformers passes None when there are no tools; templates test `tools is none` or `if tools`.
      tools: options.tools ?? null,
      add_generation_prompt: options.addGenerationPrompt ?? true,
      raise_exception: (message: unknown) => {
        throw new MoeflashError('INVALID_ARGUMENT', `the chat template (${this.origin}) rejected the messages: ${String(message)}`);
      },
      strftime_now: (format: unknown) => strftime(now(), String(format)),
    };
    try {
      // Template.render declares its own raise_exception and strftime_now, which cannot be
      // redeclared, so the environment is built here instead.
      const env = new Environment();
      for (const [key, value] of Object.entries(context)) env.set(key, value);
      const result = new Interpreter(env).run(template.parsed).value;
      if (typeof result !== 'string') {
        throw new Error(`rendering produced ${typeof result}, not text`);
      }
      return result;
    } catch (err) {
      if (err instanceof MoeflashError) throw err;
      throw new MoeflashError(
        'TOKENIZER_INVALID',
        `the chat template (${this.origin}, "${name}") failed to render: ${describe(err)}`,
        { cause: err },
      );
    }
  }

  /** transformers' choice among named templates: "tool_use" when tools are given, else "default". */
  private pick(options: Pick<ChatTemplateOptions, 'templateName' | 'tools'>): string {
    if (options.templateName !== undefined) {
      if (!this.sources.has(options.templateName)) {
        throw new MoeflashError(
          'INVALID_ARGUMENT',
          `no chat template named "${options.templateName}" in ${this.origin}; available: ${this.names.join(', ')}`,
        );
      }
      return options.templateName;
    }
    if (options.tools != null && this.sources.has('tool_use')) return 'tool_use';
    if (this.sources.has('default')) return 'default';
    if (this.sources.size === 1) return this.names[0]!;
    throw new MoeflashError(
      'INVALID_ARGUMENT',
      `${this.origin} has several chat templates (${this.names.join(', ')}) and none is called "default": pass templateName`,
    );
  }

  private compile(name: string): Template {
    let template = this.compiled.get(name);
    if (template === undefined) {
      // Parsing waits until first use so that a template this engine cannot parse does not stop a
      // model from being used with raw prompts.
      try {
        template = new Template(this.sources.get(name)!);
      } catch (err) {
        throw new MoeflashError(
          'TOKENIZER_INVALID',
          `cannot parse the chat template (${this.origin}, "${name}"): ${describe(err)}`,
          { cause: err },
        );
      }
      this.compiled.set(name, template);
    }
    return template;
  }
}

function validateMessages(messages: readonly ChatMessage[]): void {
  if (!Array.isArray(messages)) {
    throw new MoeflashError('INVALID_ARGUMENT', 'chat messages must be an array of { role, content } objects');
  }
  messages.forEach((m, i) => {
    if (!isPlainObject(m) || typeof m.role !== 'string') {
      throw new MoeflashError('INVALID_ARGUMENT', `chat message ${i} must be an object with a string "role"`);
    }
  });
}

/**
 * Finds the chat template of a model folder. A `chat_template.jinja` file wins over the
 * `chat_template` field of tokenizer_config.json, as in transformers. `null` when there is none.
 */
export async function loadChatTemplate(
  dir: string,
  tokenizerConfig: Record<string, unknown> = {},
): Promise<ChatTemplate | null> {
  const special = chatSpecialTokens(tokenizerConfig);
  const jinjaPath = join(dir, 'chat_template.jinja');
  const fromFile = await readOptionalText(jinjaPath, 'TOKENIZER_INVALID');
  if (fromFile !== null) return new ChatTemplate(fromFile, special, jinjaPath);

  const configPath = join(dir, 'tokenizer_config.json');
  const field = tokenizerConfig.chat_template;
  if (field === undefined || field === null) return null;
  if (typeof field === 'string') return new ChatTemplate(field, special, configPath);
  if (Array.isArray(field)) {
    const named: Record<string, string> = {};
    field.forEach((entry, i) => {
      if (!isPlainObject(entry) || typeof entry.name !== 'string' || typeof entry.template !== 'string') {
        throw new MoeflashError(
          'TOKENIZER_INVALID',
          `${configPath}: chat_template[${i}] must be an object { "name": string, "template": string }`,
        );
      }
      named[entry.name] = entry.template;
    });
    return new ChatTemplate(named, special, configPath);
  }
  throw new MoeflashError(
    'TOKENIZER_INVALID',
    `${configPath}: chat_template must be a string or a list of { name, template } objects`,
  );
}

/** The error for a chat request to a model without a template; `where` names its tokenizer files. */
export function missingChatTemplateError(where: string): MoeflashError {
  return new MoeflashError(
    'TOKENIZER_INVALID',
    `no chat template for the model of ${where}: its folder has neither chat_template.jinja nor a ` +
      `chat_template field in tokenizer_config.json. Pass a plain prompt instead of messages, or put ` +
      `a chat_template.jinja file in the model folder`,
  );
}

const DAYS = ['Sunday', 'Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday'];
const MONTHS = [
  'January', 'February', 'March', 'April', 'May', 'June',
  'July', 'August', 'September', 'October', 'November', 'December',
];

/**
 * Python's `time.strftime` in the C locale (English names, local time), which is what
 * `strftime_now` calls in transformers; templates print dates such as "26 Jul 2024" with it.
 */
export function strftime(date: Date, format: string): string {
  const pad = (n: number, width = 2) => String(n).padStart(width, '0');
  const hour12 = date.getHours() % 12 === 0 ? 12 : date.getHours() % 12;
  const startOfYear = new Date(date.getFullYear(), 0, 1);
  const dayOfYear = Math.round((new Date(date.getFullYear(), date.getMonth(), date.getDate()).getTime() - startOfYear.getTime()) / 86_400_000) + 1;
  return format.replace(/%([a-zA-Z%])/g, (whole, d: string) => {
    switch (d) {
      case 'Y': return String(date.getFullYear());
      case 'y': return pad(date.getFullYear() % 100);
      case 'm': return pad(date.getMonth() + 1);
      case 'd': return pad(date.getDate());
      case 'e': return String(date.getDate()).padStart(2, ' ');
      case 'H': return pad(date.getHours());
      case 'I': return pad(hour12);
      case 'M': return pad(date.getMinutes());
      case 'S': return pad(date.getSeconds());
      case 'p': return date.getHours() < 12 ? 'AM' : 'PM';
      case 'j': return pad(dayOfYear, 3);
      case 'a': return DAYS[date.getDay()]!.slice(0, 3);
      case 'A': return DAYS[date.getDay()]!;
      case 'b': return MONTHS[date.getMonth()]!.slice(0, 3);
      case 'B': return MONTHS[date.getMonth()]!;
      case '%': return '%';
      default: return whole;
    }
  });
}
