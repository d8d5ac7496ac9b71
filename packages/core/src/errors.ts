/**
 * Every error moeflash raises on purpose is a MoeflashError with a stable `code`, a message that
 * names the cause (file, field, tensor) and, where there is one, the fix.
 */
export type ErrorCode =
  | 'CONFIG_INVALID'
  | 'CONFIG_UNSUPPORTED'
  | 'WEIGHTS_INVALID'
  | 'WEIGHTS_MISSING'
  | 'TOKENIZER_INVALID'
  | 'BACKEND_UNAVAILABLE'
  | 'OUT_OF_MEMORY'
  | 'INVALID_ARGUMENT'
  | 'ABORTED'
  | 'CLOSED';

export class MoeflashError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'MoeflashError';
    this.code = code;
  }
}
