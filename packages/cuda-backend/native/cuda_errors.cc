#include "cuda_errors.h"

#include <cstdio>

namespace moeflash {

std::string format_bytes(size_t n) {
  char buf[64];
  const double v = static_cast<double>(n);
  if (n >= (size_t{1} << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", v / (1u << 30));
  else if (n >= (size_t{1} << 20)) std::snprintf(buf, sizeof buf, "%.1f MiB", v / (1u << 20));
  else if (n >= 1024) std::snprintf(buf, sizeof buf, "%.1f KiB", v / 1024);
  else std::snprintf(buf, sizeof buf, "%zu B", n);
  return buf;
}

void throw_out_of_memory(Napi::Env env, const std::string& call, size_t requested) {
  cudaGetLastError();
  size_t free_b = 0, total_b = 0;
  int dev = -1;
  cudaGetDevice(&dev);
  const bool known = cudaMemGetInfo(&free_b, &total_b) == cudaSuccess;
  cudaGetLastError();
  std::string msg = "CUDA out of memory: " + call;
  if (requested > 0) msg += " asked for " + format_bytes(requested) + " (" + std::to_string(requested) + " bytes)";
  msg += " on device " + std::to_string(dev);
  if (known) msg += ", which has " + format_bytes(free_b) + " free of " + format_bytes(total_b);
  msg += ". Free GPU memory held by other processes, or use a smaller model, batch or context length.";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, "OUT_OF_MEMORY"));
  e.Set("requestedBytes", Napi::Number::New(env, static_cast<double>(requested)));
  if (known) {
    e.Set("freeBytes", Napi::Number::New(env, static_cast<double>(free_b)));
    e.Set("totalBytes", Napi::Number::New(env, static_cast<double>(total_b)));
  }
  throw e;
}

void check_cuda(Napi::Env env, cudaError_t err, const std::string& call) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  if (err == cudaErrorMemoryAllocation) throw_out_of_memory(env, call, 0);
  const std::string msg = "CUDA error in " + call + ": " + cudaGetErrorString(err) + " (" + cudaGetErrorName(err) + ")";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, "CUDA_ERROR"));
  e.Set("cudaError", Napi::String::New(env, cudaGetErrorName(err)));
  e.Set("cudaCall", Napi::String::New(env, call));
  throw e;
}

void throw_invalid(Napi::Env env, const std::string& message) {
  Napi::Error e = Napi::RangeError::New(env, message);
  e.Set("code", Napi::String::New(env, "INVALID_ARGUMENT"));
  throw e;
}

}  // namespace moeflash
