// CUDA failures as JavaScript errors: every message names the CUDA call, the error string and
// the error's enum name; out-of-memory says how much was asked for and how much was free.
#pragma once

#include <napi.h>

#include <cstddef>
#include <string>

#include <cuda_runtime_api.h>

namespace moeflash {

// Throws a JS Error (code 'CUDA_ERROR', cudaError, cudaCall) unless err is cudaSuccess. An
// allocation failure becomes the out-of-memory error below. Clears the sticky last error so
// that the next call does not report this one again.
void check_cuda(Napi::Env env, cudaError_t err, const std::string& call);

// Throws a JS Error with code 'OUT_OF_MEMORY', requestedBytes, freeBytes and totalBytes.
[[noreturn]] void throw_out_of_memory(Napi::Env env, const std::string& call, size_t requested);

// Throws a JS TypeError/RangeError with code 'INVALID_ARGUMENT'.
[[noreturn]] void throw_invalid(Napi::Env env, const std::string& message);

// "1.50 GiB" / "12.0 MiB" / "512 B"
std::string format_bytes(size_t n);

}  // namespace moeflash

#define MOEFLASH_CUDA(env, call) ::moeflash::check_cuda((env), (call), #call)
