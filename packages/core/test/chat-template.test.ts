import { mkdtemp, readFile, rm, writeFile, copyFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MoeflashError } from '../src/errors.js';
import {
  ChatTemplate,
  loadChatTemplate,
  loadTokenizer,
  strftime,
  type ChatMessage,
  type TextTokenizer,
} from '../src/tokenizer/index.js';

const DEMO = fileURLToPath(new URL('./fixtures/demo-tokenizer', import.meta.url));

let tok: TextTokenizer;
let scratch: string;

beforeAll(async () => {
  tok = await loadTokenizer(DEMO);
  scratch = await mkdtemp(join(tmpdir(), 'moeflash-chat-'));
});

afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

function thrown(fn: () => unknown): MoeflashError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(MoeflashError);
    return err as MoeflashError;
  }
  throw new Error('expected an error');
}

async function folderWith(files: Record<string, string>): Promise<string> {
  const dir = await mkdtemp(join(scratch, 'model-'));
  await copyFile(join(DEMO, 'tokenizer.json'), join(dir, 'tokenizer.json'));
  for (const [name, text] of Object.entries(files)) await writeFile(join(dir, name), text);
  return dir;
}

const conversation: ChatMessage[] = [
  { role: 'system', content: 'You write Python.' },
  { role: 'user', content: 'Print hello.' },
  { role: 'assistant', content: 'print("hello")' },
];

describe('demo ChatML template', () => {
  it('renders a 3-message conversation and opens the assistant turn', () => {
    expect(tok.applyChatTemplate(conversation)).toBe(
      '<|im_start|>system\nYou write Python.<|im_end|>\n' +
        '<|im_start|>user\nPrint hello.<|im_end|>\n' +
        '<|im_start|>assistant\nprint("hello")<|im_end|>\n' +
        '<|im_start|>assistant\n',
    );
    expect(tok.applyChatTemplate(conversation, { addGenerationPrompt: false })).toBe(
      '<|im_start|>system\nYou write Python.<|im_end|>\n' +
        '<|im_start|>user\nPrint hello.<|im_end|>\n' +
        '<|im_start|>assistant\nprint("hello")<|im_end|>\n',
    );
  });

  it('encodes the markers as single special tokens', () => {
    const ids = tok.encodeChat([{ role: 'user', content: 'hi' }]);
    expect(ids.filter((id) => id === 510)).toHaveLength(2);
    expect(ids.filter((id) => id === 511)).toHaveLength(1);
    expect(tok.decode(ids)).toBe('<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n');
  });

  it('renders tools, tool calls and tool results as Python jinja2 does', () => {
    // Expected text rendered by jinja2 3.1 with transformers' settings (trim_blocks, lstrip_blocks,
    // unsorted tojson) from the same template.
    const tools = [
      {
        type: 'function',
        function: {
          name: 'get_weather',
          description: 'Weather for a city',
          parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
        },
      },
    ];
    const messages: ChatMessage[] = [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'Weather in Paris?' },
      { role: 'assistant', content: null, tool_calls: [{ type: 'function', function: { name: 'get_weather', arguments: { city: 'Paris' } } }] },
      { role: 'tool', content: '{"temp": 21}' },
      { role: 'tool', content: 'sunny' },
      { role: 'assistant', content: '21 and sunny.' },
    ];
    expect(tok.applyChatTemplate(messages, { tools })).toBe(
      '<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions. Their signatures are inside <tools></tools>:\n<tools>\n' +
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n' +
        '</tools>\n\nTo call a function, answer with a JSON object inside <tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' +
        '<|im_start|>user\nWeather in Paris?<|im_end|>\n' +
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n' +
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n<tool_response>\nsunny\n</tool_response><|im_end|>\n' +
        '<|im_start|>assistant\n21 and sunny.<|im_end|>\n' +
        '<|im_start|>assistant\n',
    );
  });

  it('turns raise_exception into an INVALID_ARGUMENT error with the template message', () => {
    const err = thrown(() =>
      tok.applyChatTemplate([
        { role: 'user', content: 'hi' },
        { role: 'system', content: 'late' },
      ]),
    );
    expect(err.code).toBe('INVALID_ARGUMENT');
    expect(err.message).toContain('a system message is only allowed as the first message');
  });

  it('rejects messages that are not { role, content } objects', () => {
    expect(thrown(() => tok.applyChatTemplate([{ content: 'x' } as unknown as ChatMessage])).code).toBe('INVALID_ARGUMENT');
    expect(thrown(() => tok.applyChatTemplate('hi' as unknown as ChatMessage[])).code).toBe('INVALID_ARGUMENT');
  });
});

describe('template variables', () => {
  const probe = new ChatTemplate(
    "{{ bos_token }}|{{ eos_token }}|{% if add_generation_prompt %}gen{% endif %}|{% if tools is none %}none{% endif %}|" +
      "{{ strftime_now('%d %b %Y %H:%M') }}|{% if enable_thinking is defined and not enable_thinking %}no-think{% endif %}|" +
      '{% for i in range(2) %}{{ i }}{% endfor %}|{{ messages | length }}',
    { bos_token: '<s>', eos_token: '</s>' },
  );

  it('passes what transformers passes, plus extra variables', () => {
    const now = () => new Date(2024, 6, 26, 9, 5);
    expect(probe.apply([], { now, extra: { enable_thinking: false } })).toBe('<s>|</s>|gen|none|26 Jul 2024 09:05|no-think|01|0');
    expect(probe.apply([{ role: 'user', content: 'x' }], { now, addGenerationPrompt: false, tools: [] })).toBe(
      '<s>|</s>|||26 Jul 2024 09:05||01|1',
    );
  });

  it('formats dates like Python strftime in the C locale', () => {
    const d = new Date(2025, 0, 5, 15, 4, 9);
    expect(strftime(d, '%Y-%m-%d %H:%M:%S %y %e %I %p %j %a %A %b %B %% %Q')).toBe(
      '2025-01-05 15:04:09 25  5 03 PM 005 Sun Sunday Jan January % %Q',
    );
  });

  it('reports parse and render failures with the template origin', () => {
    const broken = new ChatTemplate('{% if %}', {}, '/m/chat_template.jinja');
    const err = thrown(() => broken.apply([]));
    expect(err.code).toBe('TOKENIZER_INVALID');
    expect(err.message).toContain('/m/chat_template.jinja');
  });
});

describe('finding the template', () => {
  it('prefers chat_template.jinja over tokenizer_config.json, as transformers does', async () => {
    const dir = await folderWith({
      'tokenizer_config.json': JSON.stringify({ chat_template: 'from config', eos_token: '<|im_end|>' }),
      'chat_template.jinja': 'from file {{ eos_token }}',
    });
    expect((await loadTokenizer(dir)).applyChatTemplate([])).toBe('from file <|im_end|>');
    expect((await ChatTemplate.load(dir))?.origin).toBe(join(dir, 'chat_template.jinja'));
  });

  it('picks "default" from a list of named templates, "tool_use" when tools are given', async () => {
    const config = {
      chat_template: [
        { name: 'tool_use', template: 'tools' },
        { name: 'default', template: 'plain' },
        { name: 'rag', template: 'rag' },
      ],
    };
    const t = (await loadChatTemplate(scratch, config))!;
    expect(t.names).toEqual(['tool_use', 'default', 'rag']);
    expect(t.apply([])).toBe('plain');
    expect(t.apply([], { tools: [] })).toBe('tools');
    expect(t.apply([], { templateName: 'rag' })).toBe('rag');
    expect(thrown(() => t.apply([], { templateName: 'nope' })).message).toContain('tool_use, default, rag');
    const noDefault = (await loadChatTemplate(scratch, { chat_template: [{ name: 'a', template: 'A' }, { name: 'b', template: 'B' }] }))!;
    expect(thrown(() => noDefault.apply([])).message).toContain('templateName');
  });

  it('says how to go on when the model has no chat template', async () => {
    const dir = await folderWith({ 'tokenizer_config.json': JSON.stringify({ eos_token: '<|im_end|>' }) });
    const bare = await loadTokenizer(dir);
    expect(bare.chatTemplate).toBeNull();
    expect(await ChatTemplate.load(dir)).toBeNull();
    const err = thrown(() => bare.applyChatTemplate([{ role: 'user', content: 'hi' }]));
    expect(err.code).toBe('TOKENIZER_INVALID');
    expect(err.message).toContain(dir);
    expect(err.message).toContain('plain prompt');
    expect(err.message).toContain('chat_template.jinja');
  });

  it('names tokenizer_config.json when chat_template has the wrong shape', async () => {
    const dir = await folderWith({ 'tokenizer_config.json': JSON.stringify({ chat_template: 42 }) });
    const err = await loadTokenizer(dir).catch((e: unknown) => e as MoeflashError);
    expect(err).toBeInstanceOf(MoeflashError);
    expect((err as MoeflashError).message).toContain(join(dir, 'tokenizer_config.json'));
    const listDir = await folderWith({ 'tokenizer_config.json': JSON.stringify({ chat_template: [{ name: 'default' }] }) });
    await expect(loadTokenizer(listDir)).rejects.toThrow(/chat_template\[0\]/);
  });

  it('keeps the demo template in tokenizer_config.json identical to its source', async () => {
    const config = JSON.parse(await readFile(join(DEMO, 'tokenizer_config.json'), 'utf8'));
    const source = await readFile(fileURLToPath(new URL('../../../tools/demo-tokenizer/chat_template.jinja', import.meta.url)), 'utf8');
    expect(config.chat_template).toBe(source.trimEnd());
  });
});
