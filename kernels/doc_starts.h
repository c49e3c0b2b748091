// The document starts of one 64-token chunk as a 64-bit mask (bit i: token i starts a document, its log gate
// is -inf), and the positions the sm_90a kernels' gate mode 2 reads from it (wgmma.cuh, ResetTile,
// ChunkView<2>). Host and device: the bit logic is tested on the host (tests/cpp/test_wgmma.cu).
#pragma once

#if defined(__CUDACC__)
#define LASP_HD __host__ __device__ __forceinline__
#else
#define LASP_HD inline
#endif

namespace lasp {
namespace cuda {
namespace wg {

// Leading zeros (64 for 0) and the 1-based position of the lowest set bit (0 for 0) of a 64-bit word.
LASP_HD int clz64(unsigned long long x) {
#if defined(__CUDA_ARCH__)
  return __clzll(static_cast<long long>(x));
#else
  return x ? __builtin_clzll(x) : 64;
#endif
}
LASP_HD int ffs64(unsigned long long x) {
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(x));
#else
  return __builtin_ffsll(static_cast<long long>(x));
#endif
}

// The 32 bits of x at the even bit positions of a 64-bit word.
LASP_HD unsigned long long spread_bits(unsigned x) {
  unsigned long long v = x;
  v = (v | (v << 16)) & 0x0000FFFF0000FFFFull;
  v = (v | (v << 8)) & 0x00FF00FF00FF00FFull;
  v = (v | (v << 4)) & 0x0F0F0F0F0F0F0F0Full;
  v = (v | (v << 2)) & 0x3333333333333333ull;
  return (v | (v << 1)) & 0x5555555555555555ull;
}

// The chunk's mask from the starts among tokens 2l (bit l of even) and 2l + 1 (bit l of odd), l = 0 .. 31:
// what one warp's two ballots give when lane l holds tokens 2l and 2l + 1.
LASP_HD unsigned long long starts_mask(unsigned even, unsigned odd) {
  return spread_bits(even) | (spread_bits(odd) << 1);
}

// The last start at or before token t (0 <= t < 64), or -1.
LASP_HD int last_start(unsigned long long m, int t) { return 63 - clz64(m & (~0ull >> (63 - t))); }

// Gate mode 1 (wgmma.cuh, GateTile) factors a chunk's weights exp(cf[t] - cf[s]) into exp(cf[t]) exp(-cf[s])
// where the chunk's sum of finite log gates, cf[63] (the smallest cf, as every log gate is <= 0), is at
// least kGateFactorMin: both factors then lie in [exp(-64), exp(64)], normal floats with room for the
// products of a few more (scale, P) before the float range ends; weaker chunks keep one exp per weight.
constexpr float kGateFactorMin = -64.f;
LASP_HD bool gate_factored(float total) { return total >= kGateFactorMin; }

// The first start after token s (0 <= s < 64), or 64.
LASP_HD int next_start(unsigned long long m, int s) {
  const unsigned long long x = s >= 63 ? 0ull : m >> (s + 1);
  return x ? s + ffs64(x) : 64;
}

}  // namespace wg
}  // namespace cuda
}  // namespace lasp
