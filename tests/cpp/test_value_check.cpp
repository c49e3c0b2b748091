// GoogleTest of the ops' log-gate value check kernel (kernels/value_check.h): for each dtype, arrays that
// hold only allowed values (<= 0, -0, -inf, 0) and arrays with one bad value (> 0, +inf, the smallest
// positive, NaN) at the first, a middle and the last position, at lengths around the grid's stride.
#include <gtest/gtest.h>

#if defined(LASP_WITH_CUDA)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "device_buffers.h"
#include "value_check.h"

namespace {

template <typename T>
T from_double(double x);
template <>
float from_double<float>(double x) { return static_cast<float>(x); }
template <>
double from_double<double>(double x) { return x; }
template <>
__half from_double<__half>(double x) { return __float2half(static_cast<float>(x)); }
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double x) { return __float2bfloat16(static_cast<float>(x)); }

// The flag bits flag_bad_gates leaves for the values xs (as T).
template <typename T>
unsigned run_check(const std::vector<double>& xs, lasp::cuda::ValueDtype dt) {
  std::vector<T> host(std::max<size_t>(1, xs.size()));
  for (size_t i = 0; i < xs.size(); ++i) host[i] = from_double<T>(xs[i]);
  DeviceBuffers<T> bufs;
  const T* dev = bufs.up(host);
  DeviceBuffers<unsigned> flag;
  unsigned* word = flag.up({0u});
  EXPECT_EQ(lasp::cuda::flag_bad_gates(dev, static_cast<int64_t>(xs.size()), dt, word, nullptr), cudaSuccess);
  std::vector<unsigned> bits_h(1);
  flag.down(bits_h, word);
  const unsigned bits = bits_h[0];
  return bits;
}

template <typename T>
void check_dtype(lasp::cuda::ValueDtype dt, bool narrow) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  // a positive value the check must not lose: the smallest subnormal (fp32, fp64), 1e-7 (subnormal in fp16)
  const double tiny = narrow ? 1e-7 : (sizeof(T) == 8 ? 4.9e-324 : 1.4e-45);
  for (int64_t n : {1, 2, 255, 256, 257, 4099, 262144 + 3}) {
    std::vector<double> xs(n);
    for (int64_t i = 0; i < n; ++i) xs[i] = i % 5 == 0 ? -inf : i % 7 == 0 ? 0.0 : i % 11 == 0 ? -0.0 : -0.001 * (1 + i % 97);
    EXPECT_EQ(run_check<T>(xs, dt), 0u) << "n = " << n << ": allowed values flagged";
    for (int64_t at : {int64_t{0}, n / 2, n - 1}) {
      for (double bad : {0.5, inf, tiny, nan}) {
        std::vector<double> ys = xs;
        ys[at] = bad;
        const unsigned want = std::isnan(bad) ? 2u : 1u;
        EXPECT_EQ(run_check<T>(ys, dt), want) << "n = " << n << ", value " << bad << " at " << at;
      }
    }
  }
  EXPECT_EQ(run_check<T>({}, dt), 0u) << "no values";
}

TEST(ValueCheck, FlagsPositiveAndNaNInEveryDtype) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  check_dtype<float>(lasp::cuda::ValueDtype::F32, false);
  check_dtype<double>(lasp::cuda::ValueDtype::F64, false);
  check_dtype<__half>(lasp::cuda::ValueDtype::F16, true);
  check_dtype<__nv_bfloat16>(lasp::cuda::ValueDtype::BF16, true);
}

}  // namespace

#else  // !LASP_WITH_CUDA

TEST(ValueCheck, Skipped) { GTEST_SKIP() << "no CUDA device: lasp was built without CUDA (LASP_WITH_CUDA unset)"; }

#endif
