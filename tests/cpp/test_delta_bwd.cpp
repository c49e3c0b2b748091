// GoogleTest of the gated delta rule's per-chunk gradient block program (kernels/delta_bwd.h) on the host (each
// phase for every thread of the block, as between the kernel's barriers) and of its CUDA kernel on a device,
// against the header's formulas computed directly in double on random inputs (gam lower triangular with
// zeros above, as the op gives it).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "delta_bwd.h"
#include "interval_exec.h"
#if defined(LASP_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "delta_chain_api.h"
#include "device_buffers.h"
#endif

namespace {

using lasp::cuda::BwdArgs;

struct BwdCase {
  int64_t chunks;
  int C, D, E;
};

const BwdCase kBwdCases[] = {
    {2, 64, 128, 128},                   // the common shape
    {2, 64, 64, 64},   {1, 64, 40, 24},  // the sizes of the op's float64 test
    {3, 5, 3, 7},                        // a small chunk, odd dims
    {2, 17, 33, 1},                      // one value column
    {2, 1, 8, 8},                        // one token per chunk
    {1, 16, 300, 8},                     // two passes over D
};

template <typename T>
struct BwdData {
  std::vector<T> q, k, v, beta, pre, gam, kk, w, S, dSe, u, dO, dR;  // inputs
  std::vector<T> dq, dk, dv, dbeta, dg;                              // outputs
};

template <typename T>
BwdData<T> make_bwd(const BwdCase& c, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  BwdData<T> d;
  auto fill = [&](std::vector<T>& x, size_t n, double s) {
    x.resize(n);
    for (auto& e : x) e = static_cast<T>(s * nd(gen));
  };
  const size_t n = c.chunks, C = c.C, D = c.D, E = c.E;
  fill(d.q, n * C * D, 1.0);
  fill(d.k, n * C * D, 1.0 / std::sqrt((double)D));
  fill(d.v, n * C * E, 1.0);
  fill(d.kk, n * C * C, 1.0);
  fill(d.w, n * C * (E + D), 1.0);
  fill(d.S, n * D * E, 1.0);
  fill(d.dSe, n * D * E, 1.0);
  fill(d.u, n * C * E, 1.0);
  fill(d.dO, n * C * E, 1.0);
  fill(d.dR, n * C * (E + D), 1.0);
  d.beta.resize(n * C);
  d.pre.resize(n * C);
  for (auto& e : d.beta) e = static_cast<T>(ud(gen));
  for (auto& e : d.pre) e = static_cast<T>(ud(gen));
  d.gam.resize(n * C * C);
  for (size_t ch = 0; ch < n; ++ch)
    for (size_t i = 0; i < C; ++i)
      for (size_t j = 0; j < C; ++j)
        d.gam[(ch * C + i) * C + j] = static_cast<T>(j < i ? ud(gen) : (j == i ? 1.0 : 0.0));
  const T junk = T(-7);
  d.dq.assign(n * C * D, junk);
  d.dk = d.dq;
  d.dv.assign(n * C * E, junk);
  d.dbeta.assign(n * C, junk);
  d.dg = d.dbeta;
  return d;
}

template <typename T>
BwdArgs<T> bwd_args(const BwdCase& c, BwdData<T>& d) {
  BwdArgs<T> a;
  a.chunks = c.chunks;
  a.C = c.C;
  a.D = c.D;
  a.E = c.E;
  a.scale = static_cast<T>(0.3);
  a.q = d.q.data();
  a.k = d.k.data();
  a.v = d.v.data();
  a.beta = d.beta.data();
  a.pre = d.pre.data();
  a.gam = d.gam.data();
  a.kk = d.kk.data();
  a.w = d.w.data();
  a.S = d.S.data();
  a.dSe = d.dSe.data();
  a.u = d.u.data();
  a.dO = d.dO.data();
  a.dR = d.dR.data();
  a.dq = d.dq.data();
  a.dk = d.dk.data();
  a.dv = d.dv.data();
  a.dbeta = d.dbeta.data();
  a.dg = d.dg.data();
  return a;
}

// The formulas of delta_bwd.h in double, for one chunk; each output's largest error relative to its largest
// entry.
template <typename T>
void check(const BwdCase& c, const BwdData<T>& d, double tol) {
  const int C = c.C, D = c.D, E = c.E, WD = E + D;
  const double scale = 0.3;
  double err[5] = {}, norm[5] = {};
  auto note = [&](int o, double got, double want) {
    err[o] = std::max(err[o], std::fabs(got - want));
    norm[o] = std::max(norm[o], std::fabs(want));
  };
  for (int64_t ch = 0; ch < c.chunks; ++ch) {
    auto at = [ch](const std::vector<T>& x, int rows, int cols, int i, int j) {
      return (double)x[((size_t)ch * rows + i) * cols + j];
    };
    auto q = [&](int i, int x) { return at(d.q, C, D, i, x); };
    auto k = [&](int i, int x) { return at(d.k, C, D, i, x); };
    auto v = [&](int i, int e) { return at(d.v, C, E, i, e); };
    auto gam = [&](int i, int j) { return at(d.gam, C, C, i, j); };
    auto kk = [&](int i, int j) { return at(d.kk, C, C, i, j); };
    auto w = [&](int i, int x) { return at(d.w, C, WD, i, x); };
    auto S = [&](int x, int e) { return at(d.S, D, E, x, e); };
    auto dSe = [&](int x, int e) { return at(d.dSe, D, E, x, e); };
    auto u = [&](int i, int e) { return at(d.u, C, E, i, e); };
    auto dO = [&](int i, int e) { return at(d.dO, C, E, i, e); };
    auto dR = [&](int i, int x) { return at(d.dR, C, WD, i, x); };
    auto beta = [&](int i) { return (double)d.beta[ch * C + i]; };
    auto pre = [&](int i) { return (double)d.pre[ch * C + i]; };
    std::vector<double> dA(C * C), dP(C * C), dPg(C * C), dkk(C * C), XG(C * C), udS(C * D), dOS(C * D);
    for (int i = 0; i < C; ++i)
      for (int j = 0; j < C; ++j) {
        double a = 0, p = 0, qk = 0;
        for (int x = 0; x < WD; ++x) a += dR(i, x) * w(j, x);
        for (int e = 0; e < E; ++e) p += dO(i, e) * u(j, e);
        for (int x = 0; x < D; ++x) qk += q(i, x) * k(j, x);
        dA[i * C + j] = j < i ? -a : 0.0;
        dP[i * C + j] = scale * p;
        dPg[i * C + j] = dP[i * C + j] * gam(i, j);
        dkk[i * C + j] = beta(i) * dA[i * C + j] * gam(i, j);
        XG[i * C + j] = gam(i, j) * (dP[i * C + j] * qk + beta(i) * dA[i * C + j] * kk(i, j));
      }
    for (int i = 0; i < C; ++i)
      for (int x = 0; x < D; ++x) {
        double a = 0, b = 0;
        for (int e = 0; e < E; ++e) {
          a += u(i, e) * dSe(x, e);
          b += dO(i, e) * S(x, e);
        }
        udS[i * D + x] = a;
        dOS[i * D + x] = b;
      }
    double sdS = 0;
    for (int x = 0; x < D; ++x)
      for (int e = 0; e < E; ++e) sdS += dSe(x, e) * S(x, e);
    std::vector<double> Xp(C), Xs(C);
    for (int i = 0; i < C; ++i) {
      for (int x = 0; x < D; ++x) {
        double dq = scale * pre(i) * dOS[i * D + x],
               dk = gam(C - 1, i) * udS[i * D + x] + beta(i) * pre(i) * dR(i, E + x);
        for (int j = 0; j < C; ++j) {
          dq += dPg[i * C + j] * k(j, x);
          dk += (dkk[i * C + j] + dkk[j * C + i]) * k(j, x) + dPg[j * C + i] * q(j, x);
        }
        note(0, d.dq[((size_t)ch * C + i) * D + x], dq);
        note(1, d.dk[((size_t)ch * C + i) * D + x], dk);
      }
      for (int e = 0; e < E; ++e) note(2, d.dv[((size_t)ch * C + i) * E + e], beta(i) * dR(i, e));
      double rk = 0, rv = 0, ra = 0, qdos = 0, kud = 0;
      for (int x = 0; x < D; ++x) {
        rk += dR(i, E + x) * k(i, x);
        qdos += q(i, x) * dOS[i * D + x];
        kud += k(i, x) * udS[i * D + x];
      }
      for (int e = 0; e < E; ++e) rv += dR(i, e) * v(i, e);
      for (int j = 0; j < C; ++j) ra += dA[i * C + j] * gam(i, j) * kk(i, j);
      note(3, d.dbeta[ch * C + i], rv + pre(i) * rk + ra);
      Xp[i] = pre(i) * (scale * qdos + beta(i) * rk + (i == C - 1 ? sdS : 0.0));
      Xs[i] = gam(C - 1, i) * kud;
    }
    for (int t = 0; t < C; ++t) {
      double g = 0;
      for (int i = t; i < C; ++i) g += Xp[i];
      for (int j = 0; j < t; ++j) {
        for (int i = t; i < C; ++i) g += XG[i * C + j];
        g += Xs[j];
      }
      note(4, d.dg[ch * C + t], g);
    }
  }
  const char* names[5] = {"dq", "dk", "dv", "dbeta", "dg"};
  for (int o = 0; o < 5; ++o) EXPECT_LE(err[o] / norm[o], tol) << names[o] << ", C " << C << ", D " << D << ", E " << E;
}

template <typename T>
void host_case(const BwdCase& c, double tol, unsigned seed) {
  for (bool rev : lasp_test::kOrders) {
    BwdData<T> d = make_bwd<T>(c, seed);
    const BwdArgs<T> a = bwd_args(c, d);
    lasp_test::run_blocks<T>(c.chunks, lasp::cuda::bwd_smem_bytes<T>(c.C, c.D, c.E) / sizeof(T),
                             lasp::cuda::kBwdThreads, rev,
                             [&](auto& ex, int64_t ch, T* smem) { lasp::cuda::bwd_block<T>(a, ch, smem, ex); });
    check(c, d, tol);
  }
}

TEST(DeltaBwd, HostBlockProgramMatchesFormulas) {
  unsigned seed = 1;
  for (const BwdCase& c : kBwdCases) {
    host_case<double>(c, 1e-12, seed++);
    host_case<float>(c, 5e-5, seed++);
  }
}

// The tensor-core form of the gradients (bwd_tc_block, float; its tf32 products emulated on the host).
const BwdCase kBwdTcCases[] = {
    {2, 64, 128, 128},                   // the common shape
    {2, 64, 64, 64},   {1, 64, 40, 24},  // dims not multiples of 8 or 32 (zero-padded operands)
    {1, 16, 300, 8},                     // five column tiles of dq, dk
    {2, 32, 33, 1},                      // one value column
};

#if defined(LASP_WITH_CUDA)
// The kernel on the device: d's inputs copied up, its outputs copied back into d.
template <typename T>
void bwd_on_device(BwdArgs<T>& a, BwdData<T>& d) {
  DeviceBuffers<T> buf;
  a.q = buf.up(d.q);
  a.k = buf.up(d.k);
  a.v = buf.up(d.v);
  a.beta = buf.up(d.beta);
  a.pre = buf.up(d.pre);
  a.gam = buf.up(d.gam);
  a.kk = buf.up(d.kk);
  a.w = buf.up(d.w);
  a.S = buf.up(d.S);
  a.dSe = buf.up(d.dSe);
  a.u = buf.up(d.u);
  a.dO = buf.up(d.dO);
  a.dR = buf.up(d.dR);
  a.dq = buf.up(d.dq);
  a.dk = buf.up(d.dk);
  a.dv = buf.up(d.dv);
  a.dbeta = buf.up(d.dbeta);
  a.dg = buf.up(d.dg);
  EXPECT_EQ(lasp::cuda::delta_bwd(a, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  buf.down(d.dq, a.dq);
  buf.down(d.dk, a.dk);
  buf.down(d.dv, a.dv);
  buf.down(d.dbeta, a.dbeta);
  buf.down(d.dg, a.dg);
}

#endif

void bwd_tc_case(const BwdCase& c, double tol, unsigned seed, bool device, bool rev);

void bwd_tc_case(const BwdCase& c, double tol, unsigned seed, bool device) {
  for (bool rev : lasp_test::kOrders)
    if (!(device && rev)) bwd_tc_case(c, tol, seed, device, rev);
}

void bwd_tc_case(const BwdCase& c, double tol, unsigned seed, bool device, bool rev) {
  BwdData<float> d = make_bwd<float>(c, seed);
  BwdArgs<float> a = bwd_args(c, d);
  a.tensor_cores = true;
  if (!device) {
    lasp_test::run_blocks<float>(c.chunks, lasp::cuda::bwd_tc_smem_bytes(c.C, c.D, c.E) / sizeof(float),
                                 lasp::cuda::kBwdThreads, rev,
                                 [&](auto& ex, int64_t ch, float* smem) { lasp::cuda::bwd_tc_block(a, ch, smem, ex); });
  } else {
#if defined(LASP_WITH_CUDA)
    bwd_on_device(a, d);
#endif
  }
  check(c, d, tol);
}

TEST(DeltaBwd, HostTensorCoreFormMatchesFormulas) {
  unsigned seed = 700;
  for (const BwdCase& c : kBwdTcCases) bwd_tc_case(c, 3e-3, seed++, false);
}

#if defined(LASP_WITH_CUDA)
TEST(DeltaBwd, CudaTensorCoreFormMatchesFormulas) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 8) GTEST_SKIP() << "tf32 tensor cores need sm_80";
  unsigned seed = 800;
  for (const BwdCase& c : kBwdTcCases) bwd_tc_case(c, 3e-3, seed++, true);
}
#endif

// The backward's chain inputs (pro_block): pdo = scale (Q K^T * gam)^T dO, qdo = scale Q^T diag(pre) dO, in
// double; gam's entries above its diagonal hold garbage that must not be read.
template <typename T>
void pro_case(const BwdCase& c, double tol, unsigned seed, bool device, bool tc, bool rev);

template <typename T>
void pro_case(const BwdCase& c, double tol, unsigned seed, bool device, bool tc = false) {
  for (bool rev : lasp_test::kOrders)
    if (!(device && rev)) pro_case<T>(c, tol, seed, device, tc, rev);
}

template <typename T>
void pro_case(const BwdCase& c, double tol, unsigned seed, bool device, bool tc, bool rev) {
  BwdData<T> d = make_bwd<T>(c, seed);
  const int C = c.C, D = c.D, E = c.E;
  for (int64_t ch = 0; ch < c.chunks; ++ch)
    for (int i = 0; i < C; ++i)
      for (int j = i + 1; j < C; ++j) d.gam[((size_t)ch * C + i) * C + j] = T(5);
  std::vector<T> pdo(c.chunks * C * E, T(-7)), qdo(c.chunks * D * E, T(-7));
  lasp::cuda::ProArgs<T> a;
  a.chunks = c.chunks;
  a.C = C;
  a.D = D;
  a.E = E;
  a.scale = static_cast<T>(0.3);
  a.q = d.q.data();
  a.k = d.k.data();
  a.gam = d.gam.data();
  a.pre = d.pre.data();
  a.dO = d.dO.data();
  a.pdo = pdo.data();
  a.qdo = qdo.data();
  if constexpr (std::is_same<T, float>::value) a.tensor_cores = tc;
  if (!device && tc) {
    if constexpr (std::is_same<T, float>::value) {
      lasp_test::run_blocks<float>(
          c.chunks, lasp::cuda::pro_tc_smem_bytes(C, D) / sizeof(float), lasp::cuda::kBwdThreads, rev,
          [&](auto& ex, int64_t ch, float* smem) { lasp::cuda::pro_tc_block(a, ch, smem, ex); });
    }
  } else if (!device) {
    lasp_test::run_blocks<T>(c.chunks, lasp::cuda::pro_smem_bytes<T>(C, D) / sizeof(T), lasp::cuda::kBwdThreads, rev,
                             [&](auto& ex, int64_t ch, T* smem) { lasp::cuda::pro_block<T>(a, ch, smem, ex); });
  } else {
#if defined(LASP_WITH_CUDA)
    DeviceBuffers<T> buf;
    a.q = buf.up(d.q);
    a.k = buf.up(d.k);
    a.gam = buf.up(d.gam);
    a.pre = buf.up(d.pre);
    a.dO = buf.up(d.dO);
    a.pdo = buf.up(pdo);
    a.qdo = buf.up(qdo);
    EXPECT_EQ(lasp::cuda::delta_pro(a, nullptr), cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    buf.down(pdo, a.pdo);
    buf.down(qdo, a.qdo);
#endif
  }
  double ep = 0, np = 0, eq = 0, nq = 0;
  for (int64_t ch = 0; ch < c.chunks; ++ch) {
    auto at = [ch](const std::vector<T>& x, int rows, int cols, int i, int j) {
      return (double)x[((size_t)ch * rows + i) * cols + j];
    };
    for (int j = 0; j < C; ++j)
      for (int e = 0; e < E; ++e) {
        double s = 0;
        for (int i = j; i < C; ++i) {
          double qk = 0;
          for (int x = 0; x < D; ++x) qk += at(d.q, C, D, i, x) * at(d.k, C, D, j, x);
          s += qk * at(d.gam, C, C, i, j) * at(d.dO, C, E, i, e);
        }
        ep = std::max(ep, std::fabs(at(pdo, C, E, j, e) - 0.3 * s));
        np = std::max(np, std::fabs(0.3 * s));
      }
    for (int x = 0; x < D; ++x)
      for (int e = 0; e < E; ++e) {
        double s = 0;
        for (int i = 0; i < C; ++i) s += at(d.q, C, D, i, x) * (double)d.pre[ch * C + i] * at(d.dO, C, E, i, e);
        eq = std::max(eq, std::fabs(at(qdo, D, E, x, e) - 0.3 * s));
        nq = std::max(nq, std::fabs(0.3 * s));
      }
  }
  EXPECT_LE(ep / np, tol) << "pdo, C " << C << ", D " << D << ", E " << E;
  EXPECT_LE(eq / nq, tol) << "qdo, C " << C << ", D " << D << ", E " << E;
}

TEST(DeltaBwd, HostTensorCoreChainInputsMatchFormulas) {
  unsigned seed = 900;
  for (const BwdCase& c : kBwdTcCases) pro_case<float>(c, 3e-3, seed++, false, true);
}

#if defined(LASP_WITH_CUDA)
TEST(DeltaBwd, CudaTensorCoreChainInputsMatchFormulas) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  unsigned seed = 950;
  for (const BwdCase& c : kBwdTcCases) pro_case<float>(c, 3e-3, seed++, true, true);
}
#endif

TEST(DeltaBwd, HostChainInputsMatchFormulas) {
  unsigned seed = 200;
  for (const BwdCase& c : kBwdCases) {
    pro_case<double>(c, 1e-12, seed++, false);
    pro_case<float>(c, 5e-5, seed++, false);
  }
}

#if defined(LASP_WITH_CUDA)
TEST(DeltaBwd, CudaChainInputsMatchFormulas) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  unsigned seed = 250;
  for (const BwdCase& c : kBwdCases) {
    if (lasp::cuda::delta_pro_takes(c.C, c.D, c.E, sizeof(double))) pro_case<double>(c, 1e-12, seed, true);
    if (lasp::cuda::delta_pro_takes(c.C, c.D, c.E, sizeof(float))) pro_case<float>(c, 5e-5, seed + 1, true);
    seed += 2;
  }
}
#endif

// The transposed solve with m^-1 (dr_block): dR = m^-T [dU | -dU S^T], in double from random m^-1 (lower
// triangular, garbage above its diagonal: not read), dU and S.
template <typename T>
struct DrData {
  std::vector<T> minv, dU, S, dR;
};

template <typename T>
DrData<T> make_dr(const BwdCase& c, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  DrData<T> d;
  const size_t n = c.chunks, C = c.C, D = c.D, E = c.E;
  d.minv.resize(n * C * C);
  for (size_t ch = 0; ch < n; ++ch)
    for (size_t i = 0; i < C; ++i)
      for (size_t j = 0; j < C; ++j) d.minv[(ch * C + i) * C + j] = static_cast<T>(j <= i ? nd(gen) : 0.0);
  d.dU.resize(n * C * E);
  for (auto& e : d.dU) e = static_cast<T>(nd(gen));
  d.S.resize(n * D * E);
  for (auto& e : d.S) e = static_cast<T>(nd(gen));
  d.dR.assign(n * C * (E + D), T(-7));
  return d;
}

template <typename T>
void check_dr(const BwdCase& c, const DrData<T>& d, double tol) {
  const int C = c.C, D = c.D, E = c.E, WD = E + D;
  double err = 0, norm = 0;
  for (int64_t ch = 0; ch < c.chunks; ++ch) {
    std::vector<double> dW((size_t)C * WD);
    for (int j = 0; j < C; ++j)
      for (int x = 0; x < WD; ++x) {
        double s = 0;
        if (x < E) {
          s = d.dU[((size_t)ch * C + j) * E + x];
        } else {
          for (int e = 0; e < E; ++e)
            s -= (double)d.dU[((size_t)ch * C + j) * E + e] * d.S[((size_t)ch * D + x - E) * E + e];
        }
        dW[(size_t)j * WD + x] = s;
      }
    for (int i = 0; i < C; ++i)
      for (int x = 0; x < WD; ++x) {
        double s = 0;
        for (int j = 0; j < C; ++j) s += (double)d.minv[((size_t)ch * C + j) * C + i] * dW[(size_t)j * WD + x];
        err = std::max(err, std::fabs(d.dR[((size_t)ch * C + i) * WD + x] - s));
        norm = std::max(norm, std::fabs(s));
      }
  }
  EXPECT_LE(err / norm, tol) << "dR, C " << C << ", D " << D << ", E " << E;
}

template <typename T>
lasp::cuda::DrArgs<T> dr_args(const BwdCase& c, DrData<T>& d) {
  lasp::cuda::DrArgs<T> a;
  a.chunks = c.chunks;
  a.C = c.C;
  a.D = c.D;
  a.E = c.E;
  a.minv = d.minv.data();
  a.dU = d.dU.data();
  a.S = d.S.data();
  a.dR = d.dR.data();
  return a;
}

// The SIMT program in precision T (double, then float) under both orders.
template <typename T>
void host_dr_case(const BwdCase& c, double tol, unsigned seed) {
  for (bool rev : lasp_test::kOrders) {
    DrData<T> d = make_dr<T>(c, seed);
    const auto a = dr_args(c, d);
    lasp_test::run_blocks<T>(c.chunks, lasp::cuda::dr_smem_bytes<T>(c.C, c.D, c.E) / sizeof(T), lasp::cuda::kBwdThreads,
                             rev, [&](auto& ex, int64_t ch, T* smem) { lasp::cuda::dr_block<T>(a, ch, smem, ex); });
    check_dr(c, d, tol);
  }
}

TEST(DeltaBwd, HostTransposedSolveMatchesFormula) {
  unsigned seed = 100;
  for (const BwdCase& c : kBwdCases) {
    host_dr_case<double>(c, 1e-12, seed++);
    host_dr_case<float>(c, 5e-5, seed++);
  }
}

TEST(DeltaBwd, HostTensorCoreTransposedSolveMatchesFormula) {
  unsigned seed = 1000;
  for (const BwdCase& c : kBwdTcCases) {
    for (bool rev : lasp_test::kOrders) {
      DrData<float> d = make_dr<float>(c, seed);
      auto a = dr_args(c, d);
      a.tensor_cores = true;
      lasp_test::run_blocks<float>(
          c.chunks, lasp::cuda::dr_tc_smem_bytes(c.C, c.D, c.E) / sizeof(float), lasp::cuda::kBwdThreads, rev,
          [&](auto& ex, int64_t ch, float* smem) { lasp::cuda::dr_tc_block(a, ch, smem, ex); });
      check_dr(c, d, 3e-3);
    }
    ++seed;
  }
}

#if defined(LASP_WITH_CUDA)
template <typename T>
void device_dr_case(const BwdCase& c, double tol, unsigned seed, bool tc = false) {
  DrData<T> d = make_dr<T>(c, seed);
  auto a = dr_args(c, d);
  if constexpr (std::is_same<T, float>::value) a.tensor_cores = tc;
  DeviceBuffers<T> buf;
  a.minv = buf.up(d.minv);
  a.dU = buf.up(d.dU);
  a.S = buf.up(d.S);
  a.dR = buf.up(d.dR);
  EXPECT_EQ(lasp::cuda::delta_dr(a, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  buf.down(d.dR, a.dR);
  check_dr(c, d, tol);
}

TEST(DeltaBwd, CudaTransposedSolveMatchesFormula) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  unsigned seed = 150;
  for (const BwdCase& c : kBwdCases) {
    if (lasp::cuda::delta_dr_takes(c.C, c.D, c.E, sizeof(double))) device_dr_case<double>(c, 1e-12, seed);
    if (lasp::cuda::delta_dr_takes(c.C, c.D, c.E, sizeof(float))) device_dr_case<float>(c, 5e-5, seed + 1);
    seed += 2;
  }
  EXPECT_TRUE(lasp::cuda::delta_dr_takes(64, 128, 128, sizeof(float)));
}

TEST(DeltaBwd, CudaTensorCoreTransposedSolveMatchesFormula) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  unsigned seed = 1050;
  for (const BwdCase& c : kBwdTcCases) device_dr_case<float>(c, 3e-3, seed++, true);
}

template <typename T>
void device_case(const BwdCase& c, double tol, unsigned seed) {
  BwdData<T> d = make_bwd<T>(c, seed);
  BwdArgs<T> a = bwd_args(c, d);
  bwd_on_device(a, d);
  check(c, d, tol);
}

TEST(DeltaBwd, CudaKernelMatchesFormulas) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  unsigned seed = 50;
  for (const BwdCase& c : kBwdCases) {
    if (lasp::cuda::delta_bwd_takes(c.C, c.D, c.E, sizeof(double))) device_case<double>(c, 1e-12, seed);
    if (lasp::cuda::delta_bwd_takes(c.C, c.D, c.E, sizeof(float))) device_case<float>(c, 5e-5, seed + 1);
    seed += 2;
  }
  EXPECT_TRUE(lasp::cuda::delta_bwd_takes(64, 128, 128, sizeof(float)));
  BwdArgs<float> big;
  big.chunks = 1;
  big.C = 65;
  big.D = big.E = 8;
  EXPECT_EQ(lasp::cuda::delta_bwd(big, nullptr), cudaErrorInvalidValue);
  cudaGetLastError();
}
#endif

}  // namespace
