// A warp's tensor-core tile, written once for the device and the host, for block programs (delta_chain.h's
// executors) whose products run on tensor cores: tf32 mma.sync m16n8k8 with fp32 accumulation (sm_80 and
// later). Torch-free.
//
// WarpTile<NT> is a 16 x 8 NT fp32 accumulator. Code that uses it runs inside ex.warps(f): on the device
// every thread of warp w calls f(w) and holds its fragment of the tile (rows g and g + 8, columns 8 n + 2 c
// and + 1 of each n-tile, g = lane / 4, c = lane % 4), and mma() issues the tensor-core instructions; on the
// host (HostExec::warps) f(w) runs once per warp and the tile holds all its entries, mma() multiplying with
// the operands rounded to tf32 as the device rounds them (cvt.rna: to nearest, ties away from zero). The two
// sides differ only in the order of the fp32 additions. Code inside f must be the same for the warp's 32
// threads (it reaches the tile's entries only through each()).
#pragma once
#include <cstdint>
#include <cstring>

#include "delta_chain.h"  // LASP_CHAIN_HD

namespace lasp {
namespace cuda {

// x rounded to tf32 (10 explicit mantissa bits), to nearest, ties away from zero, as cvt.rna.tf32.f32.
inline float tf32_round_host(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // finite: round the 13 low bits
  std::memcpy(&x, &u, 4);
  return x;
}

// Row lengths of staged operands for the tensor-core forms: a multiple of 32 plus 4 floats, so that a
// fragment's reads of 8 rows x 4 columns hit 32 banks; and a product's inner length rounded up to the MMA's 8.
LASP_CHAIN_HD int tc_ld(int n) { return (n + 31) / 32 * 32 + 4; }
LASP_CHAIN_HD int round8(int n) { return (n + 7) / 8 * 8; }

#if defined(__CUDACC__)
// x as tf32 bits (cvt.rna: to nearest, ties away from zero).
__device__ __forceinline__ uint32_t tf32_bits(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// d += a b on one m16n8k8 tf32 mma.sync with fp32 accumulation (sm_80 and later): a the 16 x 8 fragment, b0, b1
// the 8 x 8 one, d the 16 x 8 accumulator, in the PTX fragment layouts.
__device__ __forceinline__ void tf32_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
#endif

template <int NT>
struct WarpTile {
#if defined(__CUDA_ARCH__)
  float f[NT][4];
#else
  float f[16][8 * NT];
#endif

  LASP_CHAIN_HD void zero() {
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) f[n][e] = 0.f;
#else
    for (auto& row : f)
      for (float& x : row) x = 0.f;
#endif
  }

  // tile += A B over k < K (a multiple of 8): A(m, k) for the tile's rows m < 16, B(k, n) for its columns
  // n < 8 NT (both float, read where the device's fragments need them).
  template <typename FA, typename FB>
  LASP_CHAIN_HD void mma(int K, FA A, FB B) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
    const int l = threadIdx.x & 31, g = l >> 2, c = l & 3;
    for (int k0 = 0; k0 < K; k0 += 8) {
      const uint32_t a[4] = {tf32_bits(A(g, k0 + c)), tf32_bits(A(g + 8, k0 + c)), tf32_bits(A(g, k0 + c + 4)),
                             tf32_bits(A(g + 8, k0 + c + 4))};
#pragma unroll
      for (int n = 0; n < NT; ++n)
        tf32_mma(f[n], a, tf32_bits(B(k0 + c, 8 * n + g)), tf32_bits(B(k0 + c + 4, 8 * n + g)));
    }
#endif
#else
    for (int k = 0; k < K; ++k) {
      float a[16];
      for (int m = 0; m < 16; ++m) a[m] = tf32_round_host(A(m, k));
      for (int n = 0; n < 8 * NT; ++n) {
        const float b = tf32_round_host(B(k, n));
        for (int m = 0; m < 16; ++m) f[m][n] += a[m] * b;
      }
    }
#endif
  }

  // fn(row, column, entry&) for the entries this side holds (the device: the thread's fragment; the host: all).
  template <typename F>
  LASP_CHAIN_HD void each(F fn) {
#if defined(__CUDA_ARCH__)
    const int l = threadIdx.x & 31, g = l >> 2, c = l & 3;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) fn(g + (e >> 1) * 8, 8 * n + 2 * c + (e & 1), f[n][e]);
#else
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8 * NT; ++n) fn(m, n, f[m][n]);
#endif
  }
};

}  // namespace cuda
}  // namespace lasp
