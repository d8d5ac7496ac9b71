// Declarations shared by the addon's source files: exported functions and argument helpers.
#pragma once

#include <napi.h>

#include <cstddef>
#include <string>

#include "cuda_errors.h"
#include "device_buffer.h"

namespace moeflash {

// devices.cc
Napi::Value Probe(const Napi::CallbackInfo& info);
Napi::Value ListDevices(const Napi::CallbackInfo& info);
Napi::Value SetDevice(const Napi::CallbackInfo& info);

// ops.cc (test-only: host arrays in, host arrays out)
Napi::Object InitOps(Napi::Env env);
// ops_moe.cc: adds the tensor-core MoE layer to the ops object
void AddMoeOps(Napi::Env env, Napi::Object ops);

// bench.cc
Napi::Object InitBench(Napi::Env env);

// model.cc: the Model class (weights, KV cache, arena, step) and memInfo
void InitModel(Napi::Env env, Napi::Object exports);

// ------------------------------------------------------------------ arguments
// Each helper throws an INVALID_ARGUMENT RangeError naming the function and the argument.
struct ArgReader {
  const Napi::CallbackInfo& info;
  const char* fn;

  Napi::Env env() const { return info.Env(); }
  [[noreturn]] void fail(const std::string& what) const { throw_invalid(info.Env(), std::string(fn) + ": " + what); }

  template <typename TA>
  TA typed(size_t i, const char* name, napi_typedarray_type type, const char* type_name) const {
    const Napi::Value v = info[i];
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
      fail(std::string(name) + " must be a " + type_name);
    return v.As<TA>();
  }
  bool is_null(size_t i) const { return info.Length() <= i || info[i].IsNull() || info[i].IsUndefined(); }

  Napi::Float32Array f32(size_t i, const char* name) const {
    return typed<Napi::Float32Array>(i, name, napi_float32_array, "Float32Array");
  }
  Napi::Uint16Array bf16(size_t i, const char* name) const {
    return typed<Napi::Uint16Array>(i, name, napi_uint16_array, "Uint16Array of bf16 bits");
  }
  Napi::Uint8Array u8(size_t i, const char* name) const {
    return typed<Napi::Uint8Array>(i, name, napi_uint8_array, "Uint8Array");
  }
  Napi::Int32Array i32(size_t i, const char* name) const {
    return typed<Napi::Int32Array>(i, name, napi_int32_array, "Int32Array");
  }
  Napi::Uint32Array u32(size_t i, const char* name) const {
    return typed<Napi::Uint32Array>(i, name, napi_uint32_array, "Uint32Array");
  }
  double number(size_t i, const char* name) const {
    if (info.Length() <= i || !info[i].IsNumber()) fail(std::string(name) + " must be a number");
    return info[i].As<Napi::Number>().DoubleValue();
  }
  int integer(size_t i, const char* name, long long lo, long long hi) const {
    const double v = number(i, name);
    if (v != static_cast<double>(static_cast<long long>(v)) || v < static_cast<double>(lo) || v > static_cast<double>(hi))
      fail(std::string(name) + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
           "]; got " + std::to_string(v));
    return static_cast<int>(v);
  }
  bool boolean(size_t i, const char* name) const {
    if (info.Length() <= i || !info[i].IsBoolean()) fail(std::string(name) + " must be a boolean");
    return info[i].As<Napi::Boolean>().Value();
  }
  void length(size_t actual, size_t expected, const char* name, const char* formula) const {
    if (actual != expected)
      fail(std::string(name) + " has " + std::to_string(actual) + " elements; expected " + std::to_string(expected) +
           " (" + formula + ")");
  }
};

}  // namespace moeflash
