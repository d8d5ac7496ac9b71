// A kernel that traps, for fault-injection tests (MOEFLASH_FAULT_AFTER_STEPS in native/model.cc):
// its launch ends in a sticky CUDA error, as a real device fault (an illegal address, a failed
// assert) does, after which the CUDA context of the process is unusable.
#include "kernels.h"

namespace moeflash {
namespace {

__global__ void trap_kernel() { __trap(); }

}  // namespace

cudaError_t launch_trap(cudaStream_t stream) {
  trap_kernel<<<1, 1, 0, stream>>>();
  return cudaGetLastError();
}

}  // namespace moeflash
