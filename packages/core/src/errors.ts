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
  | 'DEVICE_ERROR'
  | 'INVALID_ARGUMENT'
  | 'ABORTED'
  | 'CLOSED';

export class MoeflashError extends Error {
  readonly code: ErrorCode;
  /**
   * Set by a backend when the device can run nothing more (a sticky CUDA error such as an illegal
   * address or a launch failure): the engine then fails every pending request with it and refuses
   * new ones. Unset, a failed step fails only the requests in it.
   */
  readonly fatal: boolean;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; fatal?: boolean }) {
    super(message, options);
    this.name = 'MoeflashError';
    this.code = code;
    this.fatal = options?.fatal === true;
  }
}

/**
 * True for an error after which the backend's device is unusable (MoeflashError.fatal). Checked
 * by the field rather than the class, so that an error from another copy of this package counts.
 */
export function isFatalBackendError(e: unknown): boolean {
  return typeof e === 'object' && e !== null && (e as { fatal?: unknown }).fatal === true;
}
