// Driver probe and device listing. The probe never throws: it reports why CUDA cannot be used,
// which is the normal state of a machine without an NVIDIA GPU.
#include <dlfcn.h>

#include <string>

#include "addon.h"
#include "cuda_errors.h"

namespace moeflash {

namespace {

// cudart_static loads the driver library itself; looking for it first tells "no driver
// installed" apart from the other failures, which cudart reports under several codes.
bool driver_library_present(std::string* why) {
  void* h = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (h == nullptr) {
    const char* e = dlerror();
    *why = e != nullptr ? e : "libcuda.so.1 not found";
    return false;
  }
  dlclose(h);
  return true;
}

Napi::Object describe(Napi::Env env, int index) {
  cudaDeviceProp p{};
  check_cuda(env, cudaGetDeviceProperties(&p, index), "cudaGetDeviceProperties(" + std::to_string(index) + ")");
  int prev = 0;
  check_cuda(env, cudaGetDevice(&prev), "cudaGetDevice");
  check_cuda(env, cudaSetDevice(index), "cudaSetDevice(" + std::to_string(index) + ")");
  size_t free_b = 0, total_b = 0;
  const cudaError_t mem = cudaMemGetInfo(&free_b, &total_b);
  cudaSetDevice(prev);
  check_cuda(env, mem, "cudaMemGetInfo(device " + std::to_string(index) + ")");
  Napi::Object o = Napi::Object::New(env);
  o.Set("index", index);
  o.Set("name", p.name);
  o.Set("totalMemory", static_cast<double>(total_b));
  o.Set("freeMemory", static_cast<double>(free_b));
  o.Set("multiprocessors", p.multiProcessorCount);
  o.Set("computeCapability", std::to_string(p.major) + "." + std::to_string(p.minor));
  o.Set("major", p.major);
  o.Set("minor", p.minor);
  o.Set("l2CacheBytes", p.l2CacheSize);
  o.Set("sharedMemoryPerBlockOptin", static_cast<double>(p.sharedMemPerBlockOptin));
  o.Set("pciBusId", p.pciBusID);
  return o;
}

}  // namespace

// probe(): { ok: true, devices, driverVersion, runtimeVersion } | { ok: false, reason, kind }
Napi::Value Probe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object r = Napi::Object::New(env);
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  r.Set("runtimeVersion", runtime);
  std::string why;
  if (!driver_library_present(&why)) {
    r.Set("ok", false);
    r.Set("kind", "no-driver");
    r.Set("reason", "no NVIDIA driver found (" + why +
                        "): the CUDA backend needs an NVIDIA GPU and its driver; use the CPU backend on this machine");
    return r;
  }
  int driver = 0;
  cudaDriverGetVersion(&driver);
  r.Set("driverVersion", driver);
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    r.Set("ok", false);
    if (err == cudaErrorNoDevice || (err == cudaSuccess && count == 0)) {
      r.Set("kind", "no-device");
      r.Set("reason", "the NVIDIA driver is installed but reports no CUDA GPU (cudaErrorNoDevice)");
    } else if (err == cudaErrorInsufficientDriver) {
      r.Set("kind", "old-driver");
      r.Set("reason", "the NVIDIA driver (CUDA " + std::to_string(driver / 1000) + "." +
                          std::to_string(driver % 1000 / 10) + ") is older than this build's CUDA runtime (" +
                          std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10) +
                          "): update the driver");
    } else {
      r.Set("kind", "cuda-error");
      r.Set("reason", std::string("CUDA initialization failed: ") + cudaGetErrorString(err) + " (" +
                          cudaGetErrorName(err) + ")");
    }
    return r;
  }
  Napi::Array devices = Napi::Array::New(env, count);
  try {
    for (int i = 0; i < count; ++i) devices.Set(i, describe(env, i));
  } catch (const Napi::Error& e) {
    r.Set("ok", false);
    r.Set("kind", "cuda-error");
    r.Set("reason", std::string("CUDA device query failed: ") + e.Message());
    return r;
  }
  r.Set("ok", true);
  r.Set("devices", devices);
  return r;
}

Napi::Value ListDevices(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int count = 0;
  check_cuda(env, cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  Napi::Array devices = Napi::Array::New(env, count);
  for (int i = 0; i < count; ++i) devices.Set(i, describe(env, i));
  return devices;
}

Napi::Value SetDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int index = info[0].As<Napi::Number>().Int32Value();
  check_cuda(env, cudaSetDevice(index), "cudaSetDevice(" + std::to_string(index) + ")");
  return env.Undefined();
}

}  // namespace moeflash
