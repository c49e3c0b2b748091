// GoogleTest of the gated delta rule's unit-triangular solve block program (kernels/delta_solve.h) on the
// host (each phase for every thread of the block, as between the kernel's barriers) and of its CUDA kernel on
// a device, against M X = R (M^T X = R transposed) checked in double.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "delta_solve.h"
#include "interval_exec.h"
#if defined(LASP_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "delta_chain_api.h"
#endif

namespace {

using lasp::cuda::SolveArgs;

struct SolveCase {
  int64_t chunks;
  int C, W;
  bool transpose;
};

const SolveCase kSolveCases[] = {
    {3, 64, 200, false},  // two column tiles, the second partial
    {2, 64, 128, true},
    {4, 5, 7, false},     // a small chunk
    {1, 64, 1, true},     // one column
    {2, 17, 300, true},   // three column tiles
};

template <typename T>
struct SolveData {
  std::vector<T> M, R, X;
};

template <typename T>
SolveData<T> make_solve(const SolveCase& k, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  SolveData<T> d;
  d.M.resize(k.chunks * k.C * k.C);
  for (int64_t c = 0; c < k.chunks; ++c)
    for (int i = 0; i < k.C; ++i)
      for (int j = 0; j < k.C; ++j) {
        // strictly lower entries of the size the delta rule's A has (beta Gam k.k, keys of norm about 1);
        // the diagonal and the upper part hold garbage the solve must not read
        const double x = j < i ? 0.3 * nd(gen) / std::sqrt((double)k.C) : (j == i ? 7.0 : -5.0);
        d.M[(c * k.C + i) * k.C + j] = static_cast<T>(x);
      }
  d.R.resize(k.chunks * k.C * k.W);
  for (auto& e : d.R) e = static_cast<T>(nd(gen));
  d.X.assign(d.R.size(), T(-9));
  return d;
}

// max |M X - R| (unit diagonal; transposed: M^T X - R) relative to max |R|, in double
template <typename T>
double residual(const SolveCase& k, const SolveData<T>& d) {
  double err = 0, norm = 0;
  for (int64_t c = 0; c < k.chunks; ++c)
    for (int i = 0; i < k.C; ++i)
      for (int w = 0; w < k.W; ++w) {
        double s = d.X[(c * k.C + i) * k.W + w];  // the unit diagonal
        for (int j = 0; j < k.C; ++j) {
          const bool below = k.transpose ? j > i : j < i;
          if (!below) continue;
          const double m = k.transpose ? d.M[(c * k.C + j) * k.C + i] : d.M[(c * k.C + i) * k.C + j];
          s += m * d.X[(c * k.C + j) * k.W + w];
        }
        const double r = d.R[(c * k.C + i) * k.W + w];
        err = std::max(err, std::fabs(s - r));
        norm = std::max(norm, std::fabs(r));
      }
  return err / norm;
}

template <typename T>
SolveArgs<T> solve_args(const SolveCase& k, SolveData<T>& d) {
  SolveArgs<T> a;
  a.chunks = k.chunks;
  a.C = k.C;
  a.W = k.W;
  a.M = d.M.data();
  a.R = d.R.data();
  a.X = d.X.data();
  a.transpose = k.transpose;
  return a;
}

template <typename T>
void host_case(const SolveCase& k, double tol, unsigned seed) {
  for (bool rev : lasp_test::kOrders) {
    SolveData<T> d = make_solve<T>(k, seed);
    const SolveArgs<T> a = solve_args(k, d);
    std::vector<T> smem(lasp::cuda::solve_smem_bytes<T>(k.C) / sizeof(T));
    lasp_test::IntervalExec ex{lasp::cuda::kSolveCols, rev};
    const int tiles = (k.W + lasp::cuda::kSolveCols - 1) / lasp::cuda::kSolveCols;
    for (int64_t c = 0; c < k.chunks; ++c)
      for (int tile = 0; tile < tiles; ++tile) {
        for (auto& e : smem) e = T(1e30);
        lasp::cuda::solve_block<T>(a, c, tile, smem.data(), ex);
      }
    EXPECT_TRUE(ex.idle());
    EXPECT_LE(residual(k, d), tol) << "C " << k.C << ", W " << k.W << ", transpose " << k.transpose;
  }
}

TEST(DeltaSolve, HostBlockProgramSolves) {
  unsigned seed = 1;
  for (const SolveCase& k : kSolveCases) {
    host_case<double>(k, 1e-13, seed++);
    host_case<float>(k, 1e-5, seed++);
  }
}

#if defined(LASP_WITH_CUDA)
template <typename T>
void device_case(const SolveCase& k, double tol, unsigned seed) {
  SolveData<T> d = make_solve<T>(k, seed);
  T *M = nullptr, *R = nullptr, *X = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&M), d.M.size() * sizeof(T)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&R), d.R.size() * sizeof(T)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&X), d.X.size() * sizeof(T)), cudaSuccess);
  cudaMemcpy(M, d.M.data(), d.M.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(R, d.R.data(), d.R.size() * sizeof(T), cudaMemcpyHostToDevice);
  SolveArgs<T> a = solve_args(k, d);
  a.M = M;
  a.R = R;
  a.X = X;
  EXPECT_EQ(lasp::cuda::delta_solve(a, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaMemcpy(d.X.data(), X, d.X.size() * sizeof(T), cudaMemcpyDeviceToHost);
  cudaFree(M);
  cudaFree(R);
  cudaFree(X);
  EXPECT_LE(residual(k, d), tol) << "C " << k.C << ", W " << k.W << ", transpose " << k.transpose;
}

TEST(DeltaSolve, CudaKernelSolves) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  unsigned seed = 50;
  for (const SolveCase& k : kSolveCases) {
    device_case<double>(k, 1e-13, seed++);
    device_case<float>(k, 1e-5, seed++);
  }
}
#endif

}  // namespace
