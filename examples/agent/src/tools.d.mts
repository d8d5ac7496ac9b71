export class ToolError extends Error {}

/** A JavaScript tool the agent can call: its schema goes to the model, `run` does the work. */
export interface AgentTool {
  name: string;
  description?: string;
  /** JSON schema of the arguments; calls are constrained to it when forced. */
  parameters: Record<string, unknown>;
  /** A call to a final tool ends the loop; its result is the answer. */
  final?: boolean;
  /** The result (JSON-able), or a throw: the loop hands the message back to the model as an error. */
  run(args: Record<string, unknown>): Promise<unknown>;
}

export function listFiles(root: string, opts?: { limit?: number }): Promise<string[]>;
export function readFileTool(opts: { root: string; choices?: string[]; maxChars?: number }): AgentTool;
export function calculatorTool(): AgentTool;
export function httpGetTool(opts: { baseUrl: string; routes?: string[]; timeoutMs?: number; maxChars?: number }): AgentTool;
export function finalAnswerTool(opts?: { maxLength?: number }): AgentTool;
