// GoogleTest of the gated delta rule's output block program (kernels/delta_out.h) on the host (each phase for
// every thread of the block, as between the kernel's barriers) and of its CUDA kernel on a device, against
// o = scale (diag(pre) Q S + (Q K^T * gam) U) computed directly in double. gam's entries above the diagonal
// hold garbage that must not be read.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "delta_out.h"
#include "interval_exec.h"
#if defined(LASP_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "delta_chain_api.h"
#include "device_buffers.h"
#endif

namespace {

using lasp::cuda::OutArgs;

struct OutCase {
  int64_t chunks;
  int C, D, E;
};

const OutCase kOutCases[] = {
    {3, 64, 128, 128},  // the common shape
    {2, 64, 256, 64},   // D = 256
    {2, 64, 64, 300},   // two passes over o's columns
    {4, 5, 3, 7},       // a small chunk, odd dims
    {2, 17, 33, 1},     // one value column
    {2, 1, 8, 8},       // one token per chunk
    {1, 40, 7, 520},    // three passes
};

template <typename T>
struct OutData {
  std::vector<T> q, k, gam, pre, S, U, o;
};

template <typename T>
OutData<T> make_out(const OutCase& c, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  OutData<T> d;
  auto fill = [&](std::vector<T>& x, size_t n, double s) {
    x.resize(n);
    for (auto& e : x) e = static_cast<T>(s * nd(gen));
  };
  fill(d.q, c.chunks * c.C * c.D, 1.0);
  fill(d.k, c.chunks * c.C * c.D, 1.0 / std::sqrt((double)c.D));
  fill(d.S, c.chunks * c.D * c.E, 1.0);
  fill(d.U, c.chunks * c.C * c.E, 1.0);
  d.gam.resize(c.chunks * c.C * c.C);
  for (int64_t ch = 0; ch < c.chunks; ++ch)
    for (int i = 0; i < c.C; ++i)
      for (int j = 0; j < c.C; ++j) d.gam[(ch * c.C + i) * c.C + j] = static_cast<T>(j <= i ? ud(gen) : 5.0);
  d.pre.resize(c.chunks * c.C);
  for (auto& e : d.pre) e = static_cast<T>(ud(gen));
  d.o.assign(c.chunks * c.C * c.E, T(-7));
  return d;
}

template <typename T>
OutArgs<T> out_args(const OutCase& c, OutData<T>& d) {
  OutArgs<T> a;
  a.chunks = c.chunks;
  a.C = c.C;
  a.D = c.D;
  a.E = c.E;
  a.scale = static_cast<T>(0.3);
  a.q = d.q.data();
  a.k = d.k.data();
  a.gam = d.gam.data();
  a.pre = d.pre.data();
  a.S = d.S.data();
  a.U = d.U.data();
  a.o = d.o.data();
  return a;
}

template <typename T>
void check(const OutCase& c, const OutData<T>& d, double tol) {
  const int C = c.C, D = c.D, E = c.E;
  double err = 0, norm = 0;
  for (int64_t ch = 0; ch < c.chunks; ++ch)
    for (int i = 0; i < C; ++i)
      for (int e = 0; e < E; ++e) {
        double qs = 0, pu = 0;
        for (int x = 0; x < D; ++x) qs += (double)d.q[(ch * C + i) * D + x] * d.S[(ch * D + x) * E + e];
        for (int j = 0; j <= i; ++j) {
          double qk = 0;
          for (int x = 0; x < D; ++x) qk += (double)d.q[(ch * C + i) * D + x] * d.k[(ch * C + j) * D + x];
          pu += qk * d.gam[(ch * C + i) * C + j] * d.U[(ch * C + j) * E + e];
        }
        const double want = 0.3 * (d.pre[ch * C + i] * qs + pu);
        err = std::max(err, std::fabs(d.o[(ch * C + i) * E + e] - want));
        norm = std::max(norm, std::fabs(want));
      }
  EXPECT_LE(err / norm, tol) << "C " << C << ", D " << D << ", E " << E;
}

template <typename T>
void host_case(const OutCase& c, double tol, unsigned seed) {
  for (bool rev : lasp_test::kOrders) {
    OutData<T> d = make_out<T>(c, seed);
    const OutArgs<T> a = out_args(c, d);
    lasp_test::run_blocks<T>(c.chunks, lasp::cuda::out_smem_bytes<T>(c.C, c.D) / sizeof(T), lasp::cuda::kOutThreads,
                             rev, [&](auto& ex, int64_t ch, T* smem) { lasp::cuda::out_block<T>(a, ch, smem, ex); });
    check(c, d, tol);
  }
}

TEST(DeltaOut, HostBlockProgramMatchesDefinition) {
  unsigned seed = 1;
  for (const OutCase& c : kOutCases) {
    host_case<double>(c, 1e-13, seed++);
    host_case<float>(c, 2e-5, seed++);
  }
}

// The tensor-core form (float; its tf32 products emulated on the host): C a multiple of 16, any D and E.
const OutCase kTcCases[] = {
    {3, 64, 128, 128},  // the common shape
    {2, 64, 256, 64},   // D = 256
    {2, 64, 64, 300},   // five column tiles of 64, the last partial
    {1, 16, 7, 520},    // D = 7 (padded to 8 with zeros), one row tile
    {2, 32, 33, 1},     // one value column
};

#if defined(LASP_WITH_CUDA)
// The kernel on the device: d's inputs copied up, its outputs copied back into d.
template <typename T>
void out_on_device(OutArgs<T>& a, OutData<T>& d) {
  DeviceBuffers<T> buf;
  a.q = buf.up(d.q);
  a.k = buf.up(d.k);
  a.gam = buf.up(d.gam);
  a.pre = buf.up(d.pre);
  a.S = buf.up(d.S);
  a.U = buf.up(d.U);
  a.o = buf.up(d.o);
  EXPECT_EQ(lasp::cuda::delta_out(a, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  buf.down(d.o, a.o);
}

#endif

void tc_case(const OutCase& c, double tol, unsigned seed, bool device, bool rev);

void tc_case(const OutCase& c, double tol, unsigned seed, bool device) {
  for (bool rev : lasp_test::kOrders)
    if (!(device && rev)) tc_case(c, tol, seed, device, rev);
}

void tc_case(const OutCase& c, double tol, unsigned seed, bool device, bool rev) {
  OutData<float> d = make_out<float>(c, seed);
  OutArgs<float> a = out_args(c, d);
  a.tensor_cores = true;
  if (!device) {
    lasp_test::run_blocks<float>(c.chunks, lasp::cuda::out_tc_smem_bytes(c.C, c.D) / sizeof(float),
                                 lasp::cuda::kOutThreads, rev,
                                 [&](auto& ex, int64_t ch, float* smem) { lasp::cuda::out_tc_block(a, ch, smem, ex); });
  } else {
#if defined(LASP_WITH_CUDA)
    out_on_device(a, d);
#endif
  }
  check(c, d, tol);
}

// tf32 keeps 11 significant bits: products of D + C terms of unit size stay within a few 1e-3 of the sum
TEST(DeltaOut, HostTensorCoreFormMatchesDefinition) {
  unsigned seed = 500;
  for (const OutCase& c : kTcCases) tc_case(c, 2e-3, seed++, false);
}

// The host's emulated tf32 rounding is what makes the form's error: with it off the residual is fp32's, so
// the tolerance above is not loose enough to hide a wrong index (a mutation test of the form fails it).

#if defined(LASP_WITH_CUDA)
TEST(DeltaOut, CudaTensorCoreFormMatchesDefinition) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 8) GTEST_SKIP() << "tf32 tensor cores need sm_80";
  unsigned seed = 600;
  for (const OutCase& c : kTcCases) tc_case(c, 2e-3, seed++, true);
}

template <typename T>
void device_case(const OutCase& c, double tol, unsigned seed) {
  OutData<T> d = make_out<T>(c, seed);
  OutArgs<T> a = out_args(c, d);
  out_on_device(a, d);
  check(c, d, tol);
}

TEST(DeltaOut, CudaKernelMatchesDefinition) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  unsigned seed = 50;
  for (const OutCase& c : kOutCases) {
    if (lasp::cuda::delta_out_takes(c.C, c.D, c.E, sizeof(double))) device_case<double>(c, 1e-13, seed);
    device_case<float>(c, 2e-5, seed + 1);
    seed += 2;
  }
  OutArgs<float> big;
  big.chunks = 1;
  big.C = 65;
  big.D = big.E = 8;
  EXPECT_EQ(lasp::cuda::delta_out(big, nullptr), cudaErrorInvalidValue);
  cudaGetLastError();
}
#endif

}  // namespace
