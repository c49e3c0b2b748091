// Shared device helpers of the lasp CUDA kernels (torch-free).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lasp_params.h"

namespace lasp {
namespace cuda {
namespace detail {

// ---- element <-> accumulator conversions ----
template <typename A, typename T>
__device__ __forceinline__ A to_acc(T x) { return static_cast<A>(x); }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A x) { return static_cast<T>(x); }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// A strided (b, h, n, x) view with a typed pointer; strides in elements.
template <typename T>
struct Tv {
  T* p;
  int64_t sb, sh, sn, sx;
  __device__ __forceinline__ T* row(int64_t b, int64_t h, int64_t n) const { return p + b * sb + h * sh + n * sn; }
  __device__ __forceinline__ T& at(int64_t b, int64_t h, int64_t n, int64_t x) const { return row(b, h, n)[x * sx]; }
};

template <typename T>
inline Tv<T> make_tv(const TensorView4& t) {
  return Tv<T>{static_cast<T*>(t.ptr), t.stride[0], t.stride[1], t.stride[2], t.stride[3]};
}
template <typename T>
inline Tv<T> make_tv_contig(void* p, int64_t H, int64_t N, int64_t X) {
  return Tv<T>{static_cast<T*>(p), H * N * X, N * X, X, 1};
}

// Problem sizes and the segment split, shared by every kernel of one call.
template <typename A>
struct Ctx {
  int B, H, Hkv, group, N, D, E;
  int Hq, Hv;      // q and v heads (head maps, lasp_params.h)
  int gq, gk, gv;  // output heads per q, k and v head: H / Hq, H / Hkv (= group), H / Hv
  A scale;
  const A* decay;  // [H] or nullptr
  const A* g;      // per-token log gates, contiguous (B, H, N), or nullptr
  int nseg;        // segments per (b, h)
  int seglen;      // tokens per segment (last may be shorter)
};

// log gamma_h = -rate_h (finite_rate: +inf read as 1e30), 0 without decay: where every kernel's decay
// powers start from.
template <typename A>
__device__ __forceinline__ A log_gamma(const A* decay, int h) {
  return decay ? -finite_rate(decay[h]) : A(0);
}
template <typename A>
__device__ __forceinline__ A log_gamma(const Ctx<A>& c, int h) {
  return log_gamma(c.decay, h);
}

}  // namespace detail
}  // namespace cuda
}  // namespace lasp
