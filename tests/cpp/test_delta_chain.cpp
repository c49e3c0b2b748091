// GoogleTest of the gated delta rule's chain block program (kernels/delta_chain.h) on the host: every block
// of the grid run phase by phase, each phase for all the block's threads (what the CUDA kernel computes
// between barriers), against the chain written directly, in double; float within its rounding.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "delta_chain.h"
#include "interval_exec.h"
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
void run_case(const Case& k, double bsign, double csign, double tol, unsigned seed, bool rev);

template <typename T>
void run_case(const Case& k, double bsign, double csign, double tol, unsigned seed) {
  for (bool rev : lasp_test::kOrders) run_case<T>(k, bsign, csign, tol, seed, rev);
}

template <typename T>
void run_case(const Case& k, double bsign, double csign, double tol, unsigned seed, bool rev) {
  Data<T> d = make<T>(k, seed);
  ChainArgs<T> a = args(k, d, bsign, csign);
  std::vector<T> smem(lasp::cuda::chain_smem_bytes<T>(k.C, k.D) / sizeof(T));
  lasp_test::IntervalExec ex{lasp::cuda::kChainThreads, rev};
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
// The tensor-core chain (delta_chain_tc.cu: tf32 products) on the device against the direct chain, with Bm
// and Cm row- or column-major and A / R with padded rows, as the op passes its views. tf32 rounds each
// operand to 11 significant bits: the tolerance is relative to the largest entry.
struct TcCase {
  Case k;
  bool bm_cols, cm_cols;  // Bm / Cm column-major (rows contiguous)
  int pad;                // extra columns in A's and R's rows
};

void run_case_tc(const TcCase& tc, double bsign, double csign, unsigned seed, bool wide = false) {
  const Case& k = tc.k;
  Data<float> d = make<float>(k, seed);
  const int C = k.C, D = k.D, W = k.W, Wp = W + tc.pad;
  const size_t nch = (size_t)k.BH * k.nc;
  std::vector<float*> bufs;
  auto up = [&](const std::vector<float>& h) -> float* {
    if (h.empty()) return nullptr;
    float* p = nullptr;
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&p), h.size() * sizeof(float)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    bufs.push_back(p);
    return p;
  };
  // (nch, R, K) row-major -> the layout asked, as a ChainMat
  auto mat = [&](const std::vector<float>& h, int R, int K, bool cols) {
    lasp::cuda::ChainMat m;
    if (!cols) {
      m.p = up(h);
      m.sch = (int64_t)R * K;
      m.sr = K;
      m.sc = 1;
      return m;
    }
    std::vector<float> t(h.size());
    for (size_t ch = 0; ch < nch; ++ch)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < K; ++c) t[(ch * K + c) * R + r] = h[(ch * R + r) * K + c];
    m.p = up(t);
    m.sch = (int64_t)R * K;
    m.sr = 1;
    m.sc = R;
    return m;
  };
  auto padded = [&](const std::vector<float>& h, int R) {  // (nch, R, W) -> rows of Wp
    lasp::cuda::ChainMat m;
    if (h.empty()) return m;
    std::vector<float> t(nch * R * Wp, 1e30f);
    for (size_t i = 0; i < nch * R; ++i)
      for (int w = 0; w < W; ++w) t[i * Wp + w] = h[i * W + w];
    m.p = up(t);
    m.sch = (int64_t)R * Wp;
    m.sr = Wp;
    m.sc = 1;
    return m;
  };
  lasp::cuda::ChainTcArgs a;
  a.BH = k.BH;
  a.nc = k.nc;
  a.C = C;
  a.D = D;
  a.W = W;
  a.A = padded(d.A, C);
  a.Bm = mat(d.Bm, C, D, tc.bm_cols);
  a.Cm = mat(d.Cm, D, C, tc.cm_cols);
  a.R = padded(d.R, D);
  a.p = up(d.p);
  a.S0 = up(d.S0);
  a.Sstore = up(d.Sstore);
  a.X = up(d.X);
  a.Sfin = up(d.Sfin);
  a.bsign = (float)bsign;
  a.csign = (float)csign;
  a.reverse = k.reverse;
  a.wide = wide;
  ASSERT_TRUE(lasp::cuda::delta_chain_tc_takes(a));
  ASSERT_EQ(lasp::cuda::delta_chain_tc(a, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  auto down = [&](std::vector<float>& h, float* p) {
    EXPECT_EQ(cudaMemcpy(h.data(), p, h.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  };
  down(d.Sstore, a.Sstore);
  down(d.X, a.X);
  down(d.Sfin, a.Sfin);
  for (float* p : bufs) cudaFree(p);
  std::vector<double> Sstore, X, Sfin;
  reference(k, d, bsign, csign, Sstore, X, Sfin);
  auto check = [&](const char* what, const std::vector<float>& got, const std::vector<double>& want) {
    double err = 0, norm = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      err = std::max(err, std::fabs((double)got[i] - want[i]));
      norm = std::max(norm, std::fabs(want[i]));
    }
    EXPECT_LE(err, 4e-3 * std::max(1.0, norm))
        << what << " (C " << C << ", D " << D << ", W " << W << ", nc " << k.nc << ", reverse " << k.reverse
        << ", wide " << wide
        << ", Bm cols " << tc.bm_cols << ", Cm cols " << tc.cm_cols << ")";
    if (!got.empty()) EXPECT_GT(norm, 0.0) << what;  // the check compares something (no chunk: Sstore, X empty)
  };
  check("Sstore", d.Sstore, Sstore);
  check("X", d.X, X);
  check("Sfin", d.Sfin, Sfin);
}

TEST(DeltaChain, TensorCoreKernelMatchesDirectChain) {
  int n = 0, major = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 8) GTEST_SKIP() << "tf32 tensor cores need sm_80";
  const TcCase cases[] = {
      // {BH, nc, C, D, W, A, R, reverse}, Bm cols, Cm cols, pad
      {{2, 5, 64, 128, 128, true, false, false}, false, true, 128},  // the forward: Wk rows padded, K^T
      {{2, 5, 64, 128, 128, true, true, true}, false, true, 0},      // the backward
      {{1, 3, 64, 128, 256, true, false, false}, false, true, 0},    // the map [T | L]
      {{3, 4, 64, 64, 40, true, true, false}, true, false, 3},       // two column tiles, the last of 8
      {{1, 3, 64, 256, 64, false, true, true}, true, true, 0},       // D = 256
      {{2, 2, 32, 48, 7, true, false, false}, false, false, 1},      // C = 32, D = 48, W = 7
      {{1, 0, 64, 64, 32, true, false, false}, false, true, 0},      // no chunk: S passes through
  };
  unsigned seed = 300;
  for (const TcCase& c : cases) {
    run_case_tc(c, -1.0, 1.0, seed++);
    run_case_tc(c, 1.0, -1.0, seed++);
  }
}

// The wide form (128 state columns per block, D <= 128): the same cases where it takes them, and more column
// counts around its tile (a partial tile, two tiles, one column).
TEST(DeltaChain, WideTensorCoreKernelMatchesDirectChain) {
  int n = 0, major = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    GTEST_SKIP() << "no CUDA device";
  }
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 8) GTEST_SKIP() << "tf32 tensor cores need sm_80";
  const TcCase cases[] = {
      // {BH, nc, C, D, W, A, R, reverse}, Bm cols, Cm cols, pad
      {{2, 5, 64, 128, 128, true, false, false}, false, true, 128},  // the forward: Wk rows padded, K^T
      {{2, 5, 64, 128, 128, true, true, true}, false, true, 0},      // the backward
      {{1, 3, 64, 128, 256, true, false, false}, false, true, 0},    // the map [T | L]: two column tiles
      {{3, 4, 64, 64, 40, true, true, false}, true, false, 3},       // D = 64 (warps 4-7 hold no S), partial tile
      {{2, 2, 32, 48, 7, true, false, false}, false, false, 1},      // C = 32 (X: warps 2, 3, 6, 7 idle)
      {{1, 3, 16, 16, 200, true, true, true}, true, true, 0},        // C = D = 16, a partial second tile
      {{1, 0, 64, 64, 32, true, false, false}, false, true, 0},      // no chunk: S passes through
  };
  unsigned seed = 400;
  for (const TcCase& c : cases) {
    run_case_tc(c, -1.0, 1.0, seed++, true);
    run_case_tc(c, 1.0, -1.0, seed++, true);
  }
  lasp::cuda::ChainTcArgs big;  // D = 256 is the narrow form's only
  big.BH = 1;
  big.C = 64;
  big.D = 256;
  big.W = 8;
  big.Bm.sr = big.Cm.sc = 1;
  big.wide = true;
  EXPECT_FALSE(lasp::cuda::delta_chain_tc_takes(big));
  big.wide = false;
  EXPECT_TRUE(lasp::cuda::delta_chain_tc_takes(big));
}
#endif

}  // namespace
