// The one switch from run-time sizes to the compile-time variants of the tensor-core kernels: the 16-bit
// element type and the compiled head dims. Each kernel file's entry points go through it, so a new dtype or
// compiled dim is added here, not at every launch.
//
//   with_type(p, f)        f(Type<__nv_bfloat16>) or f(Type<__half>), by p.dtype (bf16 / fp16 only)
//   with_dim(x, f)         f(Int<64>) for x <= 64, else f(Int<128>): the mma.sync kernels pad the true dim
//                          up to it at run time; wgmma takes exactly these two (fast::wgmma_shape)
//   with_dims(p, f)        f(Int<D>, Int<E>) for p.D, p.E
//   with_type_dims(p, f)   f(Type<T>, Int<D>, Int<E>)
// Host code only; each f returns the same type in every variant.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "lasp_params.h"

namespace lasp {
namespace cuda {
namespace fast {

template <int V>
using Int = std::integral_constant<int, V>;
template <typename T>
struct Type {
  using type = T;
};

template <typename F>
decltype(auto) with_type(const AttnParams& p, F&& f) {
  if (p.dtype == ScalarType::BFloat16) return f(Type<__nv_bfloat16>{});
  return f(Type<__half>{});
}

template <typename F>
decltype(auto) with_dim(int64_t x, F&& f) {
  if (x <= 64) return f(Int<64>{});
  return f(Int<128>{});
}

template <typename F>
decltype(auto) with_dims(const AttnParams& p, F&& f) {
  return with_dim(p.D, [&](auto d) { return with_dim(p.E, [&](auto e) { return f(d, e); }); });
}

template <typename F>
decltype(auto) with_type_dims(const AttnParams& p, F&& f) {
  return with_type(p, [&](auto t) { return with_dims(p, [&](auto d, auto e) { return f(t, d, e); }); });
}

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
