// flag_bad_gates (value_check.h): a grid-stride pass over the values, one atomicOr per warp that finds one.
#include "value_check.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace lasp {
namespace cuda {
namespace {

// The checks read bit patterns (sign, |x| against the infinity's pattern), so that no flush-to-zero of the
// fast-math build hides a subnormal positive value: U the unsigned type of T's size, INF |inf|'s bits.
template <typename T>
struct Bits;
template <>
struct Bits<__half> {
  using U = unsigned short;
  static constexpr U kInf = 0x7c00u;
};
template <>
struct Bits<__nv_bfloat16> {
  using U = unsigned short;
  static constexpr U kInf = 0x7f80u;
};
template <>
struct Bits<float> {
  using U = unsigned int;
  static constexpr U kInf = 0x7f800000u;
};
template <>
struct Bits<double> {
  using U = unsigned long long;
  static constexpr U kInf = 0x7ff0000000000000ull;
};

template <typename T>
__global__ void flag_bad_gates_kernel(const T* __restrict__ x, int64_t n, unsigned* flag) {
  using U = typename Bits<T>::U;
  constexpr U kSign = static_cast<U>(U(1) << (8 * sizeof(U) - 1));
  const U* xb = reinterpret_cast<const U*>(x);
  unsigned bits = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const U u = xb[i];
    const U mag = static_cast<U>(u & static_cast<U>(~kSign));
    if (mag > Bits<T>::kInf) {
      bits |= 2u;  // NaN
    } else if (!(u & kSign) && mag != 0) {
      bits |= 1u;  // > 0 (+inf included)
    }
  }
  // (the warp's stores below are whole-warp: every lane reaches them)
  bits = (__any_sync(0xffffffffu, bits & 1u) ? 1u : 0u) | (__any_sync(0xffffffffu, bits & 2u) ? 2u : 0u);
  if (bits != 0 && (threadIdx.x & 31) == 0) atomicOr(flag, bits);
}

template <typename T>
cudaError_t launch(const void* x, int64_t n, unsigned* flag, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 1024);
  if (blocks == 0) return cudaSuccess;
  flag_bad_gates_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), n, flag);
  return cudaGetLastError();
}

}  // namespace

cudaError_t flag_bad_gates(const void* x, int64_t n, ValueDtype dtype, unsigned* flag, cudaStream_t stream) {
  switch (dtype) {
    case ValueDtype::F16:
      return launch<__half>(x, n, flag, stream);
    case ValueDtype::BF16:
      return launch<__nv_bfloat16>(x, n, flag, stream);
    case ValueDtype::F32:
      return launch<float>(x, n, flag, stream);
    case ValueDtype::F64:
      return launch<double>(x, n, flag, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lasp
