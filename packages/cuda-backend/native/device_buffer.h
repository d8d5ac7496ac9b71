// Owning device allocations for the native ops and benchmarks. Allocation failures become the
// out-of-memory JS error of cuda_errors.h, naming the buffer and its size.
#pragma once

#include <napi.h>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime_api.h>

#include "cuda_errors.h"

namespace moeflash {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Napi::Env env, size_t bytes, const std::string& what) : bytes_(bytes) {
    if (bytes == 0) return;
    const cudaError_t err = cudaMalloc(&ptr_, bytes);
    if (err == cudaErrorMemoryAllocation) {
      ptr_ = nullptr;
      throw_out_of_memory(env, "cudaMalloc(" + what + ")", bytes);
    }
    check_cuda(env, err, "cudaMalloc(" + what + ", " + std::to_string(bytes) + " bytes)");
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(o.bytes_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (ptr_ != nullptr) cudaFree(ptr_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = o.bytes_;
    }
    return *this;
  }

  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

  // Host -> device copy of a whole host array (sizes must match).
  void upload(Napi::Env env, const void* src, size_t bytes, const std::string& what) {
    check_cuda(env, cudaMemcpy(ptr_, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy(host -> device, " + what + ")");
  }
  void download(Napi::Env env, void* dst, size_t bytes, const std::string& what) const {
    check_cuda(env, cudaMemcpy(dst, ptr_, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy(device -> host, " + what + ")");
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace moeflash
