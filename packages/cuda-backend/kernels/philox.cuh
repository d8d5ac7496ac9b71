// Philox4x32-10 (Salmon et al., SC 2011) as Random123 and cuRAND define it; core's
// sampling/rng.ts is the TypeScript twin and fixes the key/counter mapping.
#pragma once

#include <cstdint>

namespace moeflash {

struct Philox4 {
  uint32_t v[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                 uint32_t k1) {
  constexpr uint32_t kM0 = 0xd2511f53u, kM1 = 0xcd9e8d57u;
  constexpr uint32_t kW0 = 0x9e3779b9u, kW1 = 0xbb67ae85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = __umulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = __umulhi(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The sampling uniform of rng.ts: counter (position, seq, draw, purpose), key (seed_lo, seed_hi),
// first output word, top 24 bits times 2^-24 (exact in float32).
__device__ __forceinline__ float philox_uniform(uint32_t seed_lo, uint32_t seed_hi, uint32_t seq, uint32_t position,
                                                uint32_t purpose, uint32_t draw) {
  const Philox4 r = philox4x32_10(position, seq, draw, purpose, seed_lo, seed_hi);
  return __uint2float_rz(r.v[0] >> 8) * 0x1p-24f;
}

}  // namespace moeflash
