// GoogleTest of the gated delta rule's chain block program (kernels/delta_chain.h) on the host: every block
// of the grid run phase by phase, each phase for all the block's threads (what the CUDA kernel computes
// between barriers), against the chain written directly, in double; float within its rounding.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "delta_chain.h"
#if defined(LASP_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "delta_chain_api.h"
#endif

namespace {

using lasp::cuda::ChainArgs;

struct Case {
  int64_t BH, nc;
  int C, D, W;
  bool withA, withR, reverse;
};

template <typename T>
struct Data {
  std::vector<T> A, Bm, Cm, p, R, S0, Sstore, X, Sfin;
};

template <typename T>
Data<T> make(const Case& k, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.5, 1.0);
  auto fill = [&](std::vector<T>& x, size_t n, double scale) {
    x.resize(n);
    for (auto& e : x) e = static_cast<T>(nd(gen) * scale);
  };
  Data<T> d;
  const size_t BH = k.BH, nc = k.nc;
  if (k.withA) fill(d.A, BH * nc * k.C * k.W, 1.0);
  fill(d.Bm, BH * nc * k.C * k.D, 1.0 / std::sqrt((double)k.D));
  fill(d.Cm, BH * nc * k.D * k.C, 1.0 / std::sqrt((double)k.C));
  d.p.resize(BH * nc);
  for (auto& e : d.p) e = static_cast<T>(ud(gen));
  if (k.withR) fill(d.R, BH * nc * k.D * k.W, 1.0);
  fill(d.S0, BH * k.D * k.W, 1.0);
  d.Sstore.assign(BH * nc * k.D * k.W, T(-7));
  d.X.assign(BH * nc * k.C * k.W, T(-7));
  d.Sfin.assign(BH * k.D * k.W, T(-7));
  return d;
}

template <typename T>
ChainArgs<T> args(const Case& k, Data<T>& d, double bsign, double csign) {
  ChainArgs<T> a;
  a.BH = k.BH;
  a.nc = k.nc;
  a.C = k.C;
  a.D = k.D;
  a.W = k.W;
  a.A = k.withA ? d.A.data() : nullptr;
  a.Bm = d.Bm.data();
  a.Cm = d.Cm.data();
  a.p = d.p.data();
  a.R = k.withR ? d.R.data() : nullptr;
  a.S0 = d.S0.data();
  a.Sstore = d.Sstore.data();
  a.X = d.X.data();
  a.Sfin = d.Sfin.data();
  a.bsign = static_cast<T>(bsign);
  a.csign = static_cast<T>(csign);
  a.reverse = k.reverse;
  return a;
}

// The chain written directly (double).
template <typename T>
void reference(const Case& k, const Data<T>& d, double bsign, double csign, std::vector<double>& Sstore,
               std::vector<double>& X, std::vector<double>& Sfin) {
  const int C = k.C, D = k.D, W = k.W;
  Sstore.assign(k.BH * k.nc * D * W, 0.0);
  X.assign(k.BH * k.nc * C * W, 0.0);
  Sfin.assign(k.BH * D * W, 0.0);
  for (int64_t bh = 0; bh < k.BH; ++bh) {
    std::vector<double> S(D * W);
    for (int i = 0; i < D * W; ++i) S[i] = d.S0[bh * D * W + i];
    for (int64_t jj = 0; jj < k.nc; ++jj) {
      const int64_t j = k.reverse ? k.nc - 1 - jj : jj, ch = bh * k.nc + j;
      for (int i = 0; i < D * W; ++i) Sstore[ch * D * W + i] = S[i];
      std::vector<double> x(C * W);
      for (int c = 0; c < C; ++c)
        for (int w = 0; w < W; ++w) {
          double s = 0;
          for (int e = 0; e < D; ++e) s += (double)d.Bm[(ch * C + c) * D + e] * S[e * W + w];
          x[c * W + w] = (k.withA ? (double)d.A[(ch * C + c) * W + w] : 0.0) + bsign * s;
          X[(ch * C + c) * W + w] = x[c * W + w];
        }
      for (int e = 0; e < D; ++e)
        for (int w = 0; w < W; ++w) {
          double s = 0;
          for (int c = 0; c < C; ++c) s += (double)d.Cm[(ch * D + e) * C + c] * x[c * W + w];
          double v = (double)d.p[ch] * S[e * W + w] + csign * s;
          if (k.withR) v += (double)d.R[(ch * D + e) * W + w];
          S[e * W + w] = v;
        }
    }
    for (int i = 0; i < D * W; ++i) Sfin[bh * D * W + i] = S[i];
  }
}

template <typename T>
void run_case(const Case& k, double bsign, double csign, double tol, unsigned seed) {
  Data<T> d = make<T>(k, seed);
  ChainArgs<T> a = args(k, d, bsign, csign);
  std::vector<T> smem(lasp::cuda::chain_smem_bytes<T>(k.C, k.D) / sizeof(T));
  lasp::cuda::HostExec ex;
  const int tiles = (k.W + lasp::cuda::kChainCols - 1) / lasp::cuda::kChainCols;
  for (int64_t bh = 0; bh < k.BH; ++bh)
    for (int tile = 0; tile < tiles; ++tile) {
      for (auto& e : smem) e = T(1e30);  // whatever a block finds in shared memory must not matter
      lasp::cuda::chain_block<T>(a, bh, tile, smem.data(), ex);
    }
  std::vector<double> Sstore, X, Sfin;
  reference(k, d, bsign, csign, Sstore, X, Sfin);
  auto check = [&](const char* what, const std::vector<T>& got, const std::vector<double>& want) {
    ASSERT_EQ(got.size(), want.size());
    double err = 0, norm = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      err = std::max(err, std::fabs((double)got[i] - want[i]));
      norm = std::max(norm, std::fabs(want[i]));
    }
    EXPECT_LE(err, tol * std::max(1.0, norm)) << what << " (C " << k.C << ", D " << k.D << ", W " << k.W << ", nc "
                                              << k.nc << ", reverse " << k.reverse << ")";
  };
  check("Sstore", d.Sstore, Sstore);
  check("X", d.X, X);
  check("Sfin", d.Sfin, Sfin);
}

const Case kCases[] = {
    // BH, nc, C, D, W, A, R, reverse
    {2, 3, 64, 16, 8, true, false, false},    // the forward's form, a narrow state
    {1, 4, 64, 9, 40, true, true, true},      // the backward's form, two column tiles, an odd D
    {3, 2, 5, 7, 33, false, false, false},    // the map's T part (no A), a column tile of one
    {1, 1, 64, 128, 64, true, true, false},   // one chunk, D = 128
    {1, 0, 64, 8, 8, true, false, false},     // no chunk: S passes through
    {1, 2, 64, 256, 32, true, false, true},   // D = 256
};

TEST(DeltaChain, HostBlockProgramMatchesDirectChainDouble) {
  unsigned seed = 1;
  for (const Case& k : kCases) {
    run_case<double>(k, -1.0, 1.0, 1e-12, seed++);
    run_case<double>(k, 1.0, -1.0, 1e-12, seed++);
  }
}

TEST(DeltaChain, HostBlockProgramMatchesDirectChainFloat) {
  unsigned seed = 100;
  for (const Case& k : kCases) run_case<float>(k, -1.0, 1.0, 2e-4, seed++);
}

#if defined(LASP_WITH_CUDA)
// The CUDA kernel (delta_kernels.cu) on the device against the direct chain.
template <typename T>
void run_case_device(const Case& k, double tol, unsigned seed) {
  Data<T> d = make<T>(k, seed);
  std::vector<T*> bufs;
  auto up = [&](const std::vector<T>& h) -> T* {
    if (h.empty()) return nullptr;
    T* p = nullptr;
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&p), h.size() * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    bufs.push_back(p);
    return p;
  };
  ChainArgs<T> a = args(k, d, -1.0, 1.0);
  a.A = k.withA ? up(d.A) : nullptr;
  a.Bm = up(d.Bm);
  a.Cm = up(d.Cm);
  a.p = up(d.p);
  a.R = k.withR ? up(d.R) : nullptr;
  a.S0 = up(d.S0);
  a.Sstore = up(d.Sstore);
  a.X = up(d.X);
  a.Sfin = up(d.Sfin);
  ASSERT_EQ(lasp::cuda::delta_chain(a, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  auto down = [&](std::vector<T>& h, T* p) {
    EXPECT_EQ(cudaMemcpy(h.data(), p, h.size() * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  };
  down(d.Sstore, a.Sstore);
  down(d.X, a.X);
  down(d.Sfin, a.Sfin);
  for (T* p : bufs) cudaFree(p);
  std::vector<double> Sstore, X, Sfin;
  reference(k, d, -1.0, 1.0, Sstore, X, Sfin);
  auto check = [&](const char* what, const std::vector<T>& got, const std::vector<double>& want) {
    double err = 0, norm = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      err = std::max(err, std::fabs((double)got[i] - want[i]));
      norm = std::max(norm, std::fabs(want[i]));
    }
    EXPECT_LE(err, tol * std::max(1.0, norm)) << what << " (C " << k.C << ", D " << k.D << ", W " << k.W << ")";
  };
  check("Sstore", d.Sstore, Sstore);
  check("X", d.X, X);
  check("Sfin", d.Sfin, Sfin);
}

TEST(DeltaChain, CudaKernelMatchesDirectChain) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  unsigned seed = 200;
  for (const Case& k : kCases) {
    run_case_device<double>(k, 1e-12, seed++);
    run_case_device<float>(k, 2e-4, seed++);
  }
}
#endif

}  // namespace
