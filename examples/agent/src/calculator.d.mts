export class CalculatorError extends Error {}
/** The value of an arithmetic expression (no eval); throws CalculatorError naming the column at fault. */
export function evaluate(text: string): number;
