// Arithmetic without eval: a recursive-descent parser over numbers, + - * / % ^ (or **),
// parentheses, unary signs, a few functions (sqrt abs round floor ceil min max) and the
// constants pi and e. Anything else is a CalculatorError naming the column.
//
//   expr    := term (('+' | '-') term)*
//   term    := unary (('*' | '/' | '%') unary)*
//   unary   := ('+' | '-') unary | power
//   power   := primary (('^' | '**') unary)?          right-associative: 2^3^2 = 2^9
//   primary := number | '(' expr ')' | name | name '(' expr (',' expr)* ')'

export class CalculatorError extends Error {
  constructor(message) {
    super(message);
    this.name = 'CalculatorError';
  }
}

// Null prototypes: a name like "constructor" must not find Object.prototype's members.
const FUNCTIONS = {
  __proto__: null,
  sqrt: [1, Math.sqrt],
  abs: [1, Math.abs],
  round: [1, Math.round],
  floor: [1, Math.floor],
  ceil: [1, Math.ceil],
  min: [Infinity, Math.min],
  max: [Infinity, Math.max],
};
const CONSTANTS = { __proto__: null, pi: Math.PI, e: Math.E };
const MAX_LENGTH = 200;
const MAX_DEPTH = 64;

/** Splits the expression into numbers, names and operators, each with its column (1-based). */
function tokenize(text) {
  const tokens = [];
  const re = /(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|([A-Za-z_]\w*)|(\*\*|[-+*/%^(),])/y;
  let at = 0;
  for (;;) {
    while (at < text.length && /\s/.test(text[at])) at++;
    if (at === text.length) return tokens;
    re.lastIndex = at;
    const m = re.exec(text);
    if (!m) throw new CalculatorError(`unexpected character ${JSON.stringify(text[at])} at column ${at + 1}`);
    const column = at + 1;
    if (m[1] !== undefined) tokens.push({ kind: 'number', value: Number(m[1]), column });
    else if (m[2] !== undefined) tokens.push({ kind: 'name', value: m[2], column });
    else tokens.push({ kind: 'op', value: m[3], column });
    at = re.lastIndex;
  }
}

/** The value of an arithmetic expression; throws CalculatorError for anything it does not take. */
export function evaluate(text) {
  if (typeof text !== 'string') throw new CalculatorError('the expression must be a string');
  if (text.length > MAX_LENGTH) throw new CalculatorError(`the expression is longer than ${MAX_LENGTH} characters`);
  const tokens = tokenize(text);
  if (tokens.length === 0) throw new CalculatorError('the expression is empty');
  let i = 0;
  let depth = 0;
  const peek = () => tokens[i];
  const isOp = (...ops) => peek()?.kind === 'op' && ops.includes(peek().value);
  const where = () => (peek() ? `at column ${peek().column}` : 'at the end');
  const expect = (op) => {
    if (!isOp(op)) throw new CalculatorError(`expected "${op}" ${where()}`);
    i++;
  };
  const nested = (f) => {
    if (++depth > MAX_DEPTH) throw new CalculatorError(`the expression nests deeper than ${MAX_DEPTH} levels`);
    try {
      return f();
    } finally {
      depth--;
    }
  };

  const expr = () =>
    nested(() => {
      let v = term();
      while (isOp('+', '-')) v = tokens[i++].value === '+' ? v + term() : v - term();
      return v;
    });
  const term = () => {
    let v = unary();
    while (isOp('*', '/', '%')) {
      const op = tokens[i++].value;
      const r = unary();
      if ((op === '/' || op === '%') && r === 0) throw new CalculatorError('division by zero');
      v = op === '*' ? v * r : op === '/' ? v / r : v % r;
    }
    return v;
  };
  const unary = () => nested(() => (isOp('-') ? (i++, -unary()) : isOp('+') ? (i++, unary()) : power()));
  const power = () => {
    const base = primary();
    if (!isOp('^', '**')) return base;
    i++;
    return base ** unary();
  };
  const primary = () => {
    const t = peek();
    if (!t) throw new CalculatorError('the expression ends too early');
    if (t.kind === 'number') return (i++, t.value);
    if (isOp('(')) {
      i++;
      const v = expr();
      expect(')');
      return v;
    }
    if (t.kind === 'name') {
      i++;
      const name = t.value.toLowerCase();
      if (!isOp('(')) {
        if (name in CONSTANTS) return CONSTANTS[name];
        throw new CalculatorError(`unknown name "${t.value}" at column ${t.column} (constants: ${Object.keys(CONSTANTS).join(', ')})`);
      }
      const fn = FUNCTIONS[name];
      if (!fn) throw new CalculatorError(`unknown function "${t.value}" at column ${t.column} (functions: ${Object.keys(FUNCTIONS).join(', ')})`);
      i++;
      const args = [expr()];
      while (isOp(',')) (i++, args.push(expr()));
      expect(')');
      if (fn[0] !== Infinity && args.length !== fn[0]) throw new CalculatorError(`${name}() takes ${fn[0]} argument, got ${args.length}`);
      return fn[1](...args);
    }
    throw new CalculatorError(`unexpected "${t.value}" at column ${t.column}`);
  };

  const value = expr();
  if (i < tokens.length) throw new CalculatorError(`unexpected "${peek().value}" at column ${peek().column}`);
  if (!Number.isFinite(value)) throw new CalculatorError(`the result is not a finite number (${value})`);
  return value;
}
