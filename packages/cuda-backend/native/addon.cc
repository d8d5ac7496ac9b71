// Module entry: moeflash_cuda.node. The TypeScript side (src/native.ts) is the one place that
// loads it and describes these functions' types.
#include "addon.h"

namespace moeflash {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("probe", Napi::Function::New(env, Probe, "probe"));
  exports.Set("listDevices", Napi::Function::New(env, ListDevices, "listDevices"));
  exports.Set("setDevice", Napi::Function::New(env, SetDevice, "setDevice"));
  exports.Set("ops", InitOps(env));
  exports.Set("bench", InitBench(env));
  InitModel(env, exports);
  exports.Set("abiVersion", Napi::Number::New(env, 3));
  return exports;
}

}  // namespace moeflash

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return moeflash::Init(env, exports); }

NODE_API_MODULE(moeflash_cuda, InitModule)
