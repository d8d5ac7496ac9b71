/** Element types found in safetensors checkpoints moeflash reads. */
export type DType = 'BF16' | 'F16' | 'F32' | 'F64' | 'F8_E4M3' | 'F8_E5M2' | 'U8' | 'I8' | 'I16' | 'I32' | 'I64' | 'BOOL';

/** Where one tensor lives and what it is, as the file header declares it. */
export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  /** File holding it (absolute path). */
  file: string;
  /** Absolute byte offset of the first element within {@link file}. */
  offset: number;
  byteLength: number;
}

/**
 * A read-only set of named tensors (one safetensors file, or a sharded checkpoint).
 * Reads are tensor by tensor: nothing holds a whole file in memory.
 */
export interface WeightSource {
  /** Folder or file this came from (for error messages). */
  readonly origin: string;
  names(): string[];
  has(name: string): boolean;
  /** Throws a clear error naming the tensor and the file when it is missing. */
  info(name: string): TensorInfo;
  /** The tensor's raw little-endian bytes. */
  read(name: string): Promise<Uint8Array>;
  /** The tensor decoded to float32 (BF16, F16, F32, F8_E4M3, F8_E5M2, integer types). */
  readFloat32(name: string): Promise<Float32Array>;
  close(): Promise<void>;
}
