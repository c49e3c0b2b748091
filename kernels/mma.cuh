// Warp-level tensor-core helpers (mma.sync m16n8k16, ldmatrix, cp.async) for bf16 / fp16 with
// fp32 accumulation. sm_80+ (also used on sm_90a).
//
// Fragment layouts (g = lane / 4, c = lane % 4):
//   A 16x16: a[0] (row g, k 2c..2c+1), a[1] (row g+8, k 2c..), a[2] (row g, k 2c+8..), a[3] (row g+8, k 2c+8..)
//   B 16x8:  b[0] (k 2c..2c+1, col g), b[1] (k 2c+8.., col g)
//   C 16x8:  c[0], c[1] (row g, cols 2c, 2c+1), c[2], c[3] (row g+8, cols 2c, 2c+1)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lasp {
namespace cuda {
namespace mma {

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// A fragment (16 x 16) of a row-major [m][k] smem tile with leading dim ld (elements), at (m0, k0).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t* a, const T* s, int ld, int m0, int k0) {
  const int l = threadIdx.x & 31;
  ldsm_x4(a, s + (m0 + (l & 15)) * ld + k0 + (l >> 4) * 8);
}
// A fragment of A = X^T where X is a row-major [k][m] smem tile.
template <typename T>
__device__ __forceinline__ void load_a_t(uint32_t* a, const T* s, int ld, int m0, int k0) {
  const int l = threadIdx.x & 31, j = l >> 3;
  ldsm_x4_t(a, s + (k0 + (l & 7) + (j >> 1) * 8) * ld + m0 + (j & 1) * 8);
}
// B fragments of two n-tiles (n0 .. n0+15) where B^T is a row-major [n][k] smem tile:
// b[0], b[1] for n-tile n0, b[2], b[3] for n0+8.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t* b, const T* s, int ld, int k0, int n0) {
  const int l = threadIdx.x & 31;
  ldsm_x4(b, s + (n0 + (l & 7) + (l >> 4) * 8) * ld + k0 + ((l >> 3) & 1) * 8);
}
// B fragments of two n-tiles where B is a row-major [k][n] smem tile.
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t* b, const T* s, int ld, int k0, int n0) {
  const int l = threadIdx.x & 31;
  ldsm_x4_t(b, s + (k0 + (l & 7) + ((l >> 3) & 1) * 8) * ld + n0 + (l >> 4) * 8);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t x) {
  return __half22float2(*reinterpret_cast<__half2*>(&x));
}
// Multiply both halves of a packed pair by (wlo, whi).
template <typename T>
__device__ __forceinline__ uint32_t scale2(uint32_t x, float wlo, float whi) {
  const float2 f = unpack2<T>(x);
  return pack2<T>(f.x * wlo, f.y * whi);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const int sz = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(sz));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// cp.async of `rows` rows of `cols` 16-bit entries (a multiple of 8), `stride` entries apart from src, into the
// first `tile_rows` rows of dst (rows of ld entries, on 16-byte boundaries), zeros in the rows past `rows`;
// thread t's share of nthreads. The caller commits and waits.
template <typename T>
__device__ __forceinline__ void cp_rows(T* dst, int ld, const T* src, int64_t stride, int rows, int tile_rows, int cols,
                                        int t, int nthreads) {
  const int v = cols / 8;
  for (int i = t; i < tile_rows * v; i += nthreads) {
    const int r = i / v, x = (i - r * v) * 8;
    const bool ok = r < rows;
    cp_async16(dst + r * ld + x, src + (ok ? r * stride + x : 0), ok);
  }
}

// acc (rows m0 .. m0 + 15, columns n0 .. n0 + 8 NT - 1) += A B over k in [k_begin, k_end) (multiples of 16), all
// 16-bit in shared memory: A (rows of lda) row-major [m][k], or with AT its transpose stored [k][m]; B (rows of
// ldb) row-major [k][n], or with BT its transpose stored [n][k]. NT even.
template <bool AT, bool BT, int NT, typename T16>
__device__ __forceinline__ void mac(float (&acc)[NT][4], const T16* sA, int lda, const T16* sB, int ldb, int m0, int n0,
                                    int k_begin, int k_end) {
  for (int k0 = k_begin; k0 < k_end; k0 += 16) {
    uint32_t af[4], bf[4];
    if constexpr (AT) {
      load_a_t(af, sA, lda, m0, k0);
    } else {
      load_a(af, sA, lda, m0, k0);
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      if constexpr (BT) {
        load_b_nk(bf, sB, ldb, k0, n0 + 16 * np);
      } else {
        load_b_kn(bf, sB, ldb, k0, n0 + 16 * np);
      }
      mma16816<T16>(acc[2 * np], af, bf[0], bf[1]);
      mma16816<T16>(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// Whether rows of 16-bit entries at p with strides s (b, head, n) all start on 16-byte boundaries.
inline bool rows_on_16_bytes(const void* p, const int64_t* s) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0;
}

// A hint that the line at p will be read soon: into L2, no register waits for it.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

}  // namespace mma
}  // namespace cuda
}  // namespace lasp
