// The scalar arithmetic of sample_rows (sample.cu), written so that it gives the same bits as
// core's sampling/sample.ts running in V8. Host-callable as well, so that it can be checked
// against Node on a machine without a GPU.
//
// Three things make a device port of sample.ts bit-exact rather than close:
//   1. exp: V8's Math.exp is fdlibm's e_exp.c (src/base/ieee754.cc); CUDA's exp() is a different
//      approximation that differs in the last bit for some inputs. fdlibm_exp below is that code
//      with every operation rounded on its own (nvcc would otherwise fuse a * b + c, V8 never does).
//   2. Sums: the reference adds float64 values one after the other in a fixed order. A tree
//      reduction rounds differently. SumGrid/SumTerm let a block reproduce the sequential sum
//      exactly while still adding a whole block of terms per step (see sum_term_on_grid).
//   3. Ranks: logits compare as JavaScript numbers, so -0 equals +0 (order_key).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MF_SAMPLE_HD __host__ __device__ __forceinline__
#else
#define MF_SAMPLE_HD inline
#endif

namespace moeflash {
namespace sampling {

// ------------------------------------------------------------------ IEEE float64, one rounding each
#if defined(__CUDA_ARCH__)
MF_SAMPLE_HD double dadd(double a, double b) { return __dadd_rn(a, b); }
MF_SAMPLE_HD double dsub(double a, double b) { return __dsub_rn(a, b); }
MF_SAMPLE_HD double dmul(double a, double b) { return __dmul_rn(a, b); }
MF_SAMPLE_HD double ddiv(double a, double b) { return __ddiv_rn(a, b); }
MF_SAMPLE_HD uint64_t dbits(double x) { return static_cast<uint64_t>(__double_as_longlong(x)); }
MF_SAMPLE_HD double dfrom(uint64_t b) { return __longlong_as_double(static_cast<long long>(b)); }
MF_SAMPLE_HD uint32_t fbits(float x) { return __float_as_uint(x); }
MF_SAMPLE_HD float ffrom(uint32_t b) { return __uint_as_float(b); }
MF_SAMPLE_HD float to_f32(double x) { return __double2float_rn(x); }
#else
// Host builds that check these functions must not contract either (-ffp-contract=off).
MF_SAMPLE_HD double dadd(double a, double b) { return a + b; }
MF_SAMPLE_HD double dsub(double a, double b) { return a - b; }
MF_SAMPLE_HD double dmul(double a, double b) { return a * b; }
MF_SAMPLE_HD double ddiv(double a, double b) { return a / b; }
MF_SAMPLE_HD uint64_t dbits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
MF_SAMPLE_HD double dfrom(uint64_t b) {
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
MF_SAMPLE_HD uint32_t fbits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
MF_SAMPLE_HD float ffrom(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
MF_SAMPLE_HD float to_f32(double x) { return static_cast<float>(x); }
#endif

// ------------------------------------------------------------------ fdlibm exp, as V8 has it
// Same constants, branches and operation order as v8/src/base/ieee754.cc exp(); checked against
// Node's Math.exp on millions of inputs. Only exp(1) keeps its special case; callers here pass
// arguments <= 0.
MF_SAMPLE_HD double fdlibm_exp(double x) {
  constexpr double o_threshold = 7.09782712893383973096e+02;
  constexpr double u_threshold = -7.45133219101941108420e+02;
  constexpr double ln2hi = 6.93147180369123816490e-01;
  constexpr double ln2lo = 1.90821492927058770002e-10;
  constexpr double invln2 = 1.44269504088896338700e+00;
  constexpr double P1 = 1.66666666666666019037e-01;
  constexpr double P2 = -2.77777777770155933842e-03;
  constexpr double P3 = 6.61375632143793436117e-05;
  constexpr double P4 = -1.65339022054652515390e-06;
  constexpr double P5 = 4.13813679705723846039e-08;
  constexpr double E = 2.718281828459045;
  constexpr double twom1000 = 9.33263618503218878990e-302;
  constexpr double two1023 = 8.988465674311579539e307;

  const uint64_t bits = dbits(x);
  uint32_t hx = static_cast<uint32_t>(bits >> 32);
  const int xsb = static_cast<int>(hx >> 31);
  hx &= 0x7fffffffu;
  double hi = 0.0, lo = 0.0;
  int k = 0;
  if (hx >= 0x40862E42u) {  // |x| >= 709.78...
    if (hx >= 0x7FF00000u) {
      if (((hx & 0xFFFFFu) | static_cast<uint32_t>(bits)) != 0) return dadd(x, x);  // NaN
      return xsb == 0 ? x : 0.0;                                                   // exp(+-inf)
    }
    if (x > o_threshold) return dfrom(0x7FF0000000000000ull);  // huge * huge
    if (x < u_threshold) return 0.0;                            // twom1000 * twom1000
  }
  if (hx > 0x3FD62E42u) {    // |x| > 0.5 ln2
    if (hx < 0x3FF0A2B2u) {  // and |x| < 1.5 ln2
      if (x == 1.0) return E;
      hi = dsub(x, xsb ? -ln2hi : ln2hi);
      lo = xsb ? -ln2lo : ln2lo;
      k = 1 - xsb - xsb;
    } else {
      k = static_cast<int>(dadd(dmul(invln2, x), xsb ? -0.5 : 0.5));  // truncates, as static_cast
      const double t = static_cast<double>(k);
      hi = dsub(x, dmul(t, ln2hi));
      lo = dmul(t, ln2lo);
    }
    x = dsub(hi, lo);
  } else if (hx < 0x3E300000u) {  // |x| < 2^-28: huge + x > one always holds
    return dadd(1.0, x);
  }
  const double t = dmul(x, x);
  const uint32_t twopk_hi = k >= -1021 ? 0x3FF00000u + (static_cast<uint32_t>(k) << 20)
                                       : 0x3FF00000u + (static_cast<uint32_t>(k + 1000) << 20);
  const double twopk = dfrom(static_cast<uint64_t>(twopk_hi) << 32);
  const double c = dsub(x, dmul(t, dadd(P1, dmul(t, dadd(P2, dmul(t, dadd(P3, dmul(t, dadd(P4, dmul(t, P5))))))))));
  if (k == 0) return dsub(1.0, dsub(ddiv(dmul(x, c), dsub(c, 2.0)), x));
  const double y = dsub(1.0, dsub(dsub(lo, ddiv(dmul(x, c), dsub(2.0, c))), hi));
  if (k >= -1021) {
    if (k == 1024) return dmul(dmul(y, 2.0), two1023);
    return dmul(y, twopk);
  }
  return dmul(dmul(y, twopk), twom1000);
}

// The reference's weight of a logit: Math.exp((logit - lmax) / temperature), all in float64.
MF_SAMPLE_HD double logit_weight(float logit, double lmax, double temperature) {
  return fdlibm_exp(ddiv(dsub(static_cast<double>(logit), lmax), temperature));
}

// ------------------------------------------------------------------ ranks
// An unsigned key in the order of the float values (callers exclude NaN). -0 gets +0's key:
// JavaScript's > and === do not tell them apart, so neither may top-k or top-p.
MF_SAMPLE_HD uint32_t order_key(float v) {
  uint32_t b = fbits(v);
  if (b == 0x80000000u) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
MF_SAMPLE_HD float key_value(uint32_t k) { return ffrom((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

// ------------------------------------------------------------------ exact sequential sums
// A running sum s >= 0 of nonnegative float64 terms, in IEEE round-to-nearest-even, seen on its
// grid: s = q * 2^(emax - 1075) with q < 2^53 an integer, emax = max(biased exponent of s, 1).
// Every double of s's binade (and, for emax = 1, every smaller one) is a multiple of that grid
// step G, so while the sum stays in the binade, s + x rounds to s + (x rounded to a multiple of
// G), where only an exact tie (x's remainder exactly G/2) depends on s: it rounds to the even q.
// That turns a run of additions into integer additions that a block can prefix-sum; a term whose
// addition would leave the binade is then added with one plain IEEE addition.
constexpr uint64_t kMantissa = (uint64_t{1} << 52) - 1;
constexpr uint64_t kHidden = uint64_t{1} << 52;
constexpr uint64_t kGridTop = uint64_t{1} << 53;

struct SumGrid {
  uint64_t q;
  int emax;
};
MF_SAMPLE_HD SumGrid sum_grid(double s) {
  const uint64_t b = dbits(s);
  const int e = static_cast<int>(b >> 52);
  return SumGrid{e ? ((b & kMantissa) | kHidden) : (b & kMantissa), e > 1 ? e : 1};
}
// Inverse of sum_grid for q < 2^53 (q >= 2^52 whenever emax > 1, as sum_grid gives and sums keep).
MF_SAMPLE_HD double sum_value(uint64_t q, int emax) { return dfrom((static_cast<uint64_t>(emax - 1) << 52) + q); }

enum SumRound : int { kRoundDown = 0, kRoundUp = 1, kRoundTie = 2 };
struct SumTerm {
  uint64_t a;  // x = a * G + remainder, 0 <= remainder < G
  int round;   // the remainder is below, above or exactly at G / 2
  bool big;    // x >= 2^(emax - 1022): the sum leaves the binade whatever s is
};
MF_SAMPLE_HD SumTerm sum_term_on_grid(double x, int emax) {
  const uint64_t b = dbits(x);
  const int e = static_cast<int>(b >> 52);
  const uint64_t q = e ? ((b & kMantissa) | kHidden) : (b & kMantissa);
  const int ex = e > 1 ? e : 1;
  if (ex > emax) return SumTerm{0, kRoundDown, true};
  const int sh = emax - ex;  // x = q * G * 2^-sh
  if (sh == 0) return SumTerm{q, kRoundDown, false};
  if (sh >= 54) return SumTerm{0, kRoundDown, false};  // q < 2^53 <= G / 2 in units of x's step
  const uint64_t rem = q & ((uint64_t{1} << sh) - 1);
  const uint64_t half = uint64_t{1} << (sh - 1);
  return SumTerm{q >> sh, rem < half ? kRoundDown : (rem > half ? kRoundUp : kRoundTie), false};
}
// The carry of a term given the parity of q just before it.
MF_SAMPLE_HD uint64_t sum_carry(const SumTerm& t, uint64_t q_before) {
  if (t.round != kRoundTie) return static_cast<uint64_t>(t.round);
  return (q_before + t.a) & 1;  // round half to even
}

}  // namespace sampling
}  // namespace moeflash
