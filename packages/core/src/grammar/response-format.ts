/**
 * What a request's output must look like: the option types of `generate()`/`chat()` and their
 * checks, and the one normal form (`OutputGrammar`) the grammar compiler takes.
 */
import { MoeflashError } from '../errors.js';

/** OpenAI's `response_format`, as `generate(p, { responseFormat })` takes it. */
export type ResponseFormat =
  | { type: 'text' }
  /** Any JSON value that is an object. */
  | { type: 'json_object' }
  /** JSON that validates against `schema` (a JSON Schema object; `true` for any JSON value). */
  | { type: 'json_schema'; schema: Record<string, unknown> | boolean; name?: string; strict?: boolean }
  /** OpenAI's wire shape, `{ type: 'json_schema', json_schema: { name, schema, strict } }`, is taken as is. */
  | { type: 'json_schema'; json_schema: { name?: string; schema?: Record<string, unknown> | boolean; strict?: boolean } };

/**
 * The compiler's input: JSON under a schema, any JSON object, or an EBNF grammar (xgrammar's
 * dialect, GBNF-like: `root ::= "yes" | "no"`).
 */
export type OutputGrammar =
  | { kind: 'json_schema'; schema: Record<string, unknown> | boolean }
  | { kind: 'json_object' }
  | { kind: 'ebnf'; grammar: string; root: string };

/** A grammar for `generate(p, { grammar })`: EBNF text, or EBNF with a start rule other than `root`. */
export type GrammarOption = string | { ebnf: string; root?: string };

function invalid(message: string): MoeflashError {
  return new MoeflashError('INVALID_ARGUMENT', message);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The request's grammar, or null for free text; throws INVALID_ARGUMENT naming the bad field. */
export function outputGrammar(responseFormat: ResponseFormat | undefined, grammar: GrammarOption | undefined): OutputGrammar | null {
  if (responseFormat !== undefined && grammar !== undefined && (responseFormat as { type?: unknown }).type !== 'text') {
    throw invalid('responseFormat and grammar both constrain the output: pass one of them');
  }
  if (grammar !== undefined) {
    const ebnf = typeof grammar === 'string' ? grammar : isObject(grammar) ? grammar.ebnf : undefined;
    const root = isObject(grammar) && grammar.root !== undefined ? grammar.root : 'root';
    if (typeof ebnf !== 'string' || ebnf.trim() === '') {
      throw invalid('grammar must be EBNF text (for example \'root ::= "yes" | "no"\') or { ebnf, root }');
    }
    if (typeof root !== 'string' || root === '') throw invalid('grammar.root must name a rule of the grammar');
    return { kind: 'ebnf', grammar: ebnf, root };
  }
  if (responseFormat === undefined) return null;
  if (!isObject(responseFormat)) throw invalid('responseFormat must be an object such as { type: "json_object" }');
  switch (responseFormat.type) {
    case 'text':
      return null;
    case 'json_object':
      return { kind: 'json_object' };
    case 'json_schema': {
      const wire = (responseFormat as { json_schema?: unknown }).json_schema;
      const schema = wire !== undefined ? (isObject(wire) ? wire.schema : undefined) : (responseFormat as { schema?: unknown }).schema;
      if (!(isObject(schema) || typeof schema === 'boolean')) {
        throw invalid('responseFormat { type: "json_schema" } needs a schema: { type: "json_schema", schema: { type: "object", ... } }');
      }
      if (schema === false) throw invalid('responseFormat: the schema `false` accepts no value, so nothing could be generated');
      return { kind: 'json_schema', schema };
    }
    default:
      throw invalid(`responseFormat.type must be "text", "json_object" or "json_schema"; got ${JSON.stringify((responseFormat as { type?: unknown }).type)}`);
  }
}
