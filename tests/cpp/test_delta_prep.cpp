// GoogleTest of the gated delta rule's fused WY block program (kernels/delta_prep.h) on the host (each phase for
// every thread of the block, as between the kernel's barriers) and of its CUDA kernel on a device, against the
// definitions computed directly in double: gam from the gates' segment sums, K K^T, m = I + A, and w checked by
// its residual m w - R (R = [diag(beta) V | diag(beta pre) K]).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "delta_prep.h"
#include "interval_exec.h"
#if defined(LASP_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "delta_chain_api.h"
#include "device_buffers.h"
#endif

namespace {

using lasp::cuda::PrepArgs;

struct PrepCase {
  int64_t chunks;
  int C, D, E;
  bool resets;  // some gates -inf
};

const PrepCase kPrepCases[] = {
    {3, 64, 128, 128, false},  // the common shape
    {2, 64, 256, 64, true},    // D = 256 (two passes over w's 320 columns), resets
    {2, 64, 96, 256, true},    // E + D = 352
    {4, 5, 3, 7, false},       // a small chunk, odd dims
    {2, 17, 33, 1, true},      // one value column
    {1, 64, 16, 512, false},   // three passes over w's columns
    {2, 1, 8, 8, true},        // one token per chunk
};

template <typename T>
struct PrepData {
  std::vector<T> k, v, beta, g, pre, gam, kk, m, w, minv;
};

template <typename T>
PrepData<T> make_prep(const PrepCase& c, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  PrepData<T> d;
  d.k.resize(c.chunks * c.C * c.D);
  for (auto& e : d.k) e = static_cast<T>(nd(gen) / std::sqrt((double)c.D));  // keys of norm about 1
  d.v.resize(c.chunks * c.C * c.E);
  for (auto& e : d.v) e = static_cast<T>(nd(gen));
  d.beta.resize(c.chunks * c.C);
  for (auto& e : d.beta) e = static_cast<T>(ud(gen));
  d.g.resize(c.chunks * c.C);
  for (auto& e : d.g) e = static_cast<T>(-0.2 * ud(gen));
  if (c.resets)
    for (size_t i = 3; i < d.g.size(); i += 11) d.g[i] = -std::numeric_limits<T>::infinity();
  d.pre.resize(d.g.size());
  for (int64_t ch = 0; ch < c.chunks; ++ch) {
    double s = 0;
    for (int i = 0; i < c.C; ++i) {
      s += d.g[ch * c.C + i];
      d.pre[ch * c.C + i] = static_cast<T>(std::exp(s));
    }
  }
  const T junk = T(-7);  // every output entry must be written
  d.gam.assign(c.chunks * c.C * c.C, junk);
  d.kk = d.gam;
  d.m = d.gam;
  d.w.assign(c.chunks * c.C * (c.E + c.D), junk);
  d.minv = d.gam;
  return d;
}

template <typename T>
PrepArgs<T> prep_args(const PrepCase& c, PrepData<T>& d) {
  PrepArgs<T> a;
  a.chunks = c.chunks;
  a.C = c.C;
  a.D = c.D;
  a.E = c.E;
  a.k = d.k.data();
  a.v = d.v.data();
  a.beta = d.beta.data();
  a.g = d.g.data();
  a.pre = d.pre.data();
  a.gam = d.gam.data();
  a.kk = d.kk.data();
  a.m = d.m.data();
  a.w = d.w.data();
  a.minv = d.minv.data();
  return a;
}

// The largest error of each output against its definition, relative to the output's (or R's) largest entry.
template <typename T>
void check(const PrepCase& c, const PrepData<T>& d, double tol) {
  const int C = c.C, D = c.D, E = c.E, WD = E + D;
  double egam = 0, ekk = 0, em = 0, ew = 0, ngam = 0, nkk = 0, nm = 0, nr = 0;
  for (int64_t ch = 0; ch < c.chunks; ++ch) {
    const size_t cc = (size_t)ch * C * C;
    std::vector<double> m(C * C);
    for (int i = 0; i < C; ++i)
      for (int j = 0; j < C; ++j) {
        double s = 0;
        for (int u = j + 1; u <= i; ++u) s += d.g[ch * C + u];
        const double gam = j <= i ? std::exp(s) : 0.0;
        double kk = 0;
        for (int e = 0; e < D; ++e) kk += (double)d.k[(ch * C + i) * D + e] * d.k[(ch * C + j) * D + e];
        m[i * C + j] = i == j ? 1.0 : (j < i ? (double)d.beta[ch * C + i] * gam * kk : 0.0);
        egam = std::max(egam, std::fabs(d.gam[cc + i * C + j] - gam));
        ekk = std::max(ekk, std::fabs(d.kk[cc + i * C + j] - kk));
        em = std::max(em, std::fabs(d.m[cc + i * C + j] - m[i * C + j]));
        ngam = std::max(ngam, std::fabs(gam));
        nkk = std::max(nkk, std::fabs(kk));
        nm = std::max(nm, std::fabs(m[i * C + j]));
      }
    for (int i = 0; i < C; ++i)
      for (int col = 0; col < WD; ++col) {
        double s = 0;
        for (int j = 0; j <= i; ++j) s += m[i * C + j] * d.w[((size_t)ch * C + j) * WD + col];
        const double b = d.beta[ch * C + i];
        const double r =
            col < E ? b * d.v[(ch * C + i) * E + col] : b * (double)d.pre[ch * C + i] * d.k[(ch * C + i) * D + col - E];
        ew = std::max(ew, std::fabs(s - r));
        nr = std::max(nr, std::fabs(r));
      }
  }
  double einv = 0;  // m m^-1 - I
  for (int64_t ch = 0; ch < c.chunks; ++ch)
    for (int i = 0; i < C; ++i)
      for (int j = 0; j < C; ++j) {
        double s = 0;
        for (int l = 0; l < C; ++l)
          s += (double)d.m[((size_t)ch * C + i) * C + l] * d.minv[((size_t)ch * C + l) * C + j];
        einv = std::max(einv, std::fabs(s - (i == j ? 1.0 : 0.0)));
      }
  const std::string what = "C " + std::to_string(C) + ", D " + std::to_string(D) + ", E " + std::to_string(E);
  EXPECT_LE(einv, tol) << "minv, " << what;
  EXPECT_LE(egam / ngam, tol) << "gam, " << what;
  EXPECT_LE(ekk / nkk, tol) << "kk, " << what;
  EXPECT_LE(em / nm, tol) << "m, " << what;
  EXPECT_LE(ew / nr, tol) << "w (residual), " << what;
}

template <typename T>
void host_case(const PrepCase& c, double tol, unsigned seed) {
  for (bool rev : lasp_test::kOrders) {
    PrepData<T> d = make_prep<T>(c, seed);
    const PrepArgs<T> a = prep_args(c, d);
    lasp_test::run_blocks<T>(c.chunks, lasp::cuda::prep_smem_bytes<T>(c.C, c.D, c.E) / sizeof(T),
                             lasp::cuda::kPrepThreads, rev,
                             [&](auto& ex, int64_t ch, T* smem) { lasp::cuda::prep_block<T>(a, ch, smem, ex); });
    check(c, d, tol);
  }
}

TEST(DeltaPrep, HostBlockProgramMatchesDefinitions) {
  unsigned seed = 1;
  for (const PrepCase& c : kPrepCases) {
    host_case<double>(c, 1e-12, seed++);
    host_case<float>(c, 2e-5, seed++);
  }
}

// The tensor-core form (float; K K^T and m^-1 R as tf32 products, emulated on the host): C a multiple of 16.
const PrepCase kPrepTcCases[] = {
    {3, 64, 128, 128, false},  // the common shape
    {2, 64, 256, 64, true},    // D = 256, resets
    {2, 64, 96, 256, true},    // w over six column tiles of 64
    {2, 16, 33, 1, true},      // D not a multiple of 8 (zero-padded), one value column
};

#if defined(LASP_WITH_CUDA)
// The kernel on the device: d's inputs copied up, its outputs copied back into d.
template <typename T>
void prep_on_device(PrepArgs<T>& a, PrepData<T>& d) {
  DeviceBuffers<T> buf;
  a.k = buf.up(d.k);
  a.v = buf.up(d.v);
  a.beta = buf.up(d.beta);
  a.g = buf.up(d.g);
  a.pre = buf.up(d.pre);
  a.gam = buf.up(d.gam);
  a.kk = buf.up(d.kk);
  a.m = buf.up(d.m);
  a.w = buf.up(d.w);
  a.minv = buf.up(d.minv);
  EXPECT_EQ(lasp::cuda::delta_prep(a, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  buf.down(d.gam, a.gam);
  buf.down(d.kk, a.kk);
  buf.down(d.m, a.m);
  buf.down(d.w, a.w);
  buf.down(d.minv, a.minv);
}

#endif

void prep_tc_case(const PrepCase& c, double tol, unsigned seed, bool device) {
  for (bool rev : lasp_test::kOrders) {
    if (device && rev) break;
    PrepData<float> d = make_prep<float>(c, seed);
    PrepArgs<float> a = prep_args(c, d);
    a.tensor_cores = true;
    if (!device) {
      lasp_test::run_blocks<float>(c.chunks, lasp::cuda::prep_tc_smem_bytes(c.C, c.D, c.E) / sizeof(float),
                                   lasp::cuda::kPrepThreads, rev, [&](auto& ex, int64_t ch, float* smem) {
                                     lasp::cuda::prep_block<float, lasp_test::IntervalExec, true>(a, ch, smem, ex);
                                   });
    } else {
#if defined(LASP_WITH_CUDA)
      prep_on_device(a, d);
#endif
    }
    check(c, d, tol);
  }
}

// kk, m and w carry tf32's rounding (11 significant bits); gam and m m^-1 = I stay at fp32's
TEST(DeltaPrep, HostTensorCoreFormMatchesDefinitions) {
  unsigned seed = 300;
  for (const PrepCase& c : kPrepTcCases) prep_tc_case(c, 3e-3, seed++, false);
}

#if defined(LASP_WITH_CUDA)
TEST(DeltaPrep, CudaTensorCoreFormMatchesDefinitions) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 8) GTEST_SKIP() << "tf32 tensor cores need sm_80";
  unsigned seed = 350;
  for (const PrepCase& c : kPrepTcCases) prep_tc_case(c, 3e-3, seed++, true);
}
#endif

// The gates' resets give exact zeros in gam (and so in A) across them, as exp(-inf) does in the composition.
TEST(DeltaPrep, ResetsGiveExactZeros) {
  const PrepCase c{1, 8, 4, 4, false};
  PrepData<double> d = make_prep<double>(c, 7);
  d.g[3] = -std::numeric_limits<double>::infinity();
  PrepArgs<double> a = prep_args(c, d);
  a.minv = nullptr;  // not asked for: not written
  std::vector<double> smem(lasp::cuda::prep_smem_bytes<double>(c.C, c.D, c.E) / sizeof(double));
  lasp::cuda::HostExec ex{lasp::cuda::kPrepThreads};
  lasp::cuda::prep_block<double>(a, 0, smem.data(), ex);
  for (int i = 0; i < c.C; ++i)
    for (int j = 0; j < c.C; ++j) {
      const bool across = j < 3 && i >= 3;
      if (across || j > i) {
        EXPECT_EQ(d.gam[i * c.C + j], 0.0) << i << ", " << j;
        if (i != j) {
          EXPECT_EQ(d.m[i * c.C + j], 0.0) << i << ", " << j;
        }
      } else {
        EXPECT_GT(d.gam[i * c.C + j], 0.0) << i << ", " << j;
      }
      EXPECT_EQ(d.minv[i * c.C + j], -7.0);
    }
}

#if defined(LASP_WITH_CUDA)
template <typename T>
void device_case(const PrepCase& c, double tol, unsigned seed) {
  PrepData<T> d = make_prep<T>(c, seed);
  PrepArgs<T> a = prep_args(c, d);
  prep_on_device(a, d);
  check(c, d, tol);
}

TEST(DeltaPrep, CudaKernelMatchesDefinitions) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  unsigned seed = 50;
  for (const PrepCase& c : kPrepCases) {
    if (lasp::cuda::delta_prep_takes(c.C, c.D, c.E, sizeof(double))) device_case<double>(c, 1e-12, seed);
    device_case<float>(c, 2e-5, seed + 1);
    seed += 2;
  }
  // what it does not take, it refuses
  PrepArgs<float> big;
  big.chunks = 1;
  big.C = 65;
  big.D = big.E = 8;
  EXPECT_EQ(lasp::cuda::delta_prep(big, nullptr), cudaErrorInvalidValue);
  cudaGetLastError();
}
#endif

#if defined(LASP_WITH_CUDA)
// The 16-bit WY program of the sm_90a forward (delta_wy16.h): k (B, Hk, N, D) and v (B, Hv, N, E) in bf16 read
// through the head maps (k in a (B, N, Hk, D) layout, as the op's "bnhd" views give it), beta and the gates
// (B, H, N) fp32, partial last chunks and -inf gates; W_v (B, H, N, E) and W_k (B, H, N, D) against
// M^-1 [diag(beta) V | diag(beta pre) K] computed in double from the same bf16 inputs, per chunk. W carries
// bf16's rounding (2^-9 relative) and that of its products' operands (tf32 in the program; m^-1 diag(beta) and
// diag(pre) K rounded to bf16 in the mma.sync kernel): within 1e-2 of W's largest entry per (b, h).
// On the host (wy16_io's decode and the program under IntervalExec, both orders) and as the kernel on a device.
// kpad: k's rows padded by that many entries (kpad % 8 != 0: rows off 16-byte boundaries, the scalar staging)
struct Wy16Case {
  int B, H, Hk, Hv, N, D, E, kpad;
};
const Wy16Case kWy16Cases[] = {{2, 4, 2, 4, 150, 128, 64, 0},  {1, 4, 1, 2, 64, 64, 128, 0},
                               {1, 2, 2, 2, 1, 128, 128, 0},   {1, 2, 1, 1, 200, 32, 24, 0},
                               {1, 4, 2, 4, 130, 128, 128, 3}, {1, 2, 1, 2, 100, 96, 32, 0}};

double from_bf16(__nv_bfloat16 b) { return static_cast<float>(b); }

// device: the kernel (the mma.sync form where it takes the case; program_only: prep_block's program); else the
// program on the host. Returns the largest error relative to W's largest entry.
double wy16_case(const Wy16Case& c, unsigned seed, bool device, bool program_only = false) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  const int C = 64, nc = (c.N + C - 1) / C;
  const int64_t krow = (int64_t)c.Hk * c.D + c.kpad;
  std::vector<__nv_bfloat16> k((size_t)c.B * c.N * krow), v((size_t)c.B * c.Hv * c.N * c.E);
  for (auto& e : k) e = __float2bfloat16((float)(nd(gen) / std::sqrt((double)c.D)));
  for (auto& e : v) e = __float2bfloat16((float)nd(gen));
  std::vector<float> beta((size_t)c.B * c.H * c.N), g(beta.size());
  for (auto& e : beta) e = (float)ud(gen);
  for (size_t i = 0; i < g.size(); ++i) g[i] = i % 37 == 5 ? -INFINITY : (float)(-0.2 * ud(gen));
  const __nv_bfloat16 junk = __float2bfloat16(-7.f);
  std::vector<__nv_bfloat16> wv((size_t)c.B * c.H * c.N * c.E, junk), wk((size_t)c.B * c.H * c.N * c.D, junk);
  lasp::cuda::Wy16Args a;
  a.B = c.B, a.H = c.H, a.N = c.N, a.D = c.D, a.E = c.E, a.kgroup = c.H / c.Hk, a.vgroup = c.H / c.Hv;
  const int64_t ks[3] = {(int64_t)c.N * krow, c.D, krow};  // (B, N, Hk, D) memory, rows krow apart
  const int64_t vs[3] = {(int64_t)c.Hv * c.N * c.E, (int64_t)c.N * c.E, c.E};
  for (int i = 0; i < 3; ++i) a.ks[i] = ks[i], a.vs[i] = vs[i];
  a.program_only = program_only;
  EXPECT_TRUE(lasp::cuda::delta_wy16_takes(a));
  const int64_t chunks = (int64_t)c.B * c.H * nc;
  // the mma.sync form (k's rows on 16-byte boundaries, D and E multiples of 16) also writes m^-1 (Wy16Args::minv)
  const bool keeps_minv = device && !program_only && c.D % 16 == 0 && c.E % 16 == 0 && c.kpad % 8 == 0;
  std::vector<__nv_bfloat16> minv(keeps_minv ? (size_t)c.B * c.H * c.N * C : 0, junk);
  if (device) {
    DeviceBuffers<__nv_bfloat16> b16;
    DeviceBuffers<float> b32;
    a.k = b16.up(k), a.v = b16.up(v);
    a.beta = b32.up(beta), a.g = b32.up(g);
    __nv_bfloat16* dwv = b16.up(wv);
    __nv_bfloat16* dwk = b16.up(wk);
    __nv_bfloat16* dminv = keeps_minv ? b16.up(minv) : nullptr;
    a.wv = dwv, a.wk = dwk, a.minv = dminv;
    EXPECT_EQ(lasp::cuda::delta_wy16_takes(a), keeps_minv || !a.minv);
    EXPECT_EQ(lasp::cuda::delta_wy16(a, nullptr), cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    b16.down(wv, dwv);
    b16.down(wk, dwk);
    if (keeps_minv) {
      b16.down(minv, dminv);
      // again from that m^-1 (the backward's form): the same W bit for bit
      std::vector<__nv_bfloat16> wv2(wv.size(), junk), wk2(wk.size(), junk);
      __nv_bfloat16* dwv2 = b16.up(wv2);
      __nv_bfloat16* dwk2 = b16.up(wk2);
      lasp::cuda::Wy16Args a2 = a;
      a2.wv = dwv2, a2.wk = dwk2, a2.minv = nullptr, a2.minv_in = dminv;
      EXPECT_TRUE(lasp::cuda::delta_wy16_takes(a2));
      EXPECT_EQ(lasp::cuda::delta_wy16(a2, nullptr), cudaSuccess);
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      b16.down(wv2, dwv2);
      b16.down(wk2, dwk2);
      size_t diff = 0;
      for (size_t i = 0; i < wv.size(); ++i) diff += memcmp(&wv[i], &wv2[i], sizeof(wv[i])) != 0;
      for (size_t i = 0; i < wk.size(); ++i) diff += memcmp(&wk[i], &wk2[i], sizeof(wk[i])) != 0;
      EXPECT_EQ(diff, 0u) << "W from the kernel's own m^-1 differs in " << diff << " entries, N " << c.N << ", D "
                          << c.D << ", E " << c.E;
    }
  } else {
    a.k = k.data(), a.v = v.data(), a.beta = beta.data(), a.g = g.data(), a.wv = wv.data(), a.wk = wk.data();
    lasp_test::run_blocks<float>(chunks, lasp::cuda::prep_tc_smem_bytes(C, c.D, c.E) / sizeof(float),
                                 lasp::cuda::kPrepThreads, (seed & 1) != 0, [&](auto& ex, int64_t ch, float* smem) {
                                   using Io = lasp::cuda::Wy16Io<__nv_bfloat16>;
                                   lasp::cuda::prep_block<float, lasp_test::IntervalExec, true, Io>(
                                       lasp::cuda::wy16_io<__nv_bfloat16>(a, ch), ch, smem, ex);
                                 });
  }
  const int WD = c.E + c.D;
  double worst = 0;
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.H; ++h) {
      const size_t bh = (size_t)b * c.H + h;
      double err = 0, big = 0;
      for (int ci = 0; ci < nc; ++ci) {
        const int n0 = ci * C, rows = std::min(C, c.N - n0);
        auto kx = [&](int i, int x) {
          return from_bf16(k[(size_t)b * ks[0] + (size_t)(h / a.kgroup) * ks[1] + (size_t)(n0 + i) * ks[2] + x]);
        };
        auto vx = [&](int i, int x) {
          return from_bf16(v[(size_t)b * vs[0] + (size_t)(h / a.vgroup) * vs[1] + (size_t)(n0 + i) * vs[2] + x]);
        };
        auto gi = [&](int i) { return (double)g[bh * c.N + n0 + i]; };
        // W = M^-1 R by substitution down the rows, in double
        std::vector<double> W((size_t)rows * WD), pre(rows);
        double s = 0;
        for (int i = 0; i < rows; ++i) pre[i] = std::exp(s += gi(i));
        if (keeps_minv) {  // m^-1 by substitution down each column; zeros above the diagonal, exactly
          std::vector<double> A((size_t)rows * rows, 0.0), Mi((size_t)rows * rows, 0.0);
          for (int i = 0; i < rows; ++i)
            for (int j = 0; j < i; ++j) {
              double gs = 0, kk = 0;
              for (int u = j + 1; u <= i; ++u) gs += gi(u);
              for (int x = 0; x < c.D; ++x) kk += kx(i, x) * kx(j, x);
              A[(size_t)i * rows + j] = beta[bh * c.N + n0 + i] * std::exp(gs) * kk;
            }
          double merr = 0, mbig = 0;
          for (int j = 0; j < rows; ++j)
            for (int i = 0; i < rows; ++i) {
              double x = i == j ? 1.0 : 0.0;
              for (int l = j; l < i; ++l) x -= A[(size_t)i * rows + l] * Mi[(size_t)l * rows + j];
              if (i >= j) Mi[(size_t)i * rows + j] = x;
              const double got = from_bf16(minv[(bh * c.N + n0 + i) * C + j]);
              if (i < j) {
                EXPECT_EQ(got, 0.0) << "m^-1 above the diagonal, row " << n0 + i << ", column " << j;
              } else {
                merr = std::max(merr, std::fabs(got - x));
                mbig = std::max(mbig, std::fabs(x));
              }
            }
          for (int i = 0; i < rows; ++i)
            for (int j = rows; j < C; ++j)
              EXPECT_EQ(from_bf16(minv[(bh * c.N + n0 + i) * C + j]), 0.0) << "m^-1 past the chunk's rows";
          EXPECT_LE(merr, 1e-2 * mbig) << "m^-1, b " << b << ", h " << h << ", chunk " << ci << ", N " << c.N;
        }
        for (int i = 0; i < rows; ++i) {
          const double bi = beta[bh * c.N + n0 + i];
          for (int col = 0; col < WD; ++col)
            W[(size_t)i * WD + col] = col < c.E ? bi * vx(i, col) : bi * pre[i] * kx(i, col - c.E);
          for (int j = 0; j < i; ++j) {
            double gs = 0;
            for (int u = j + 1; u <= i; ++u) gs += gi(u);
            double kk = 0;
            for (int x = 0; x < c.D; ++x) kk += kx(i, x) * kx(j, x);
            const double A = bi * std::exp(gs) * kk;
            for (int col = 0; col < WD; ++col) W[(size_t)i * WD + col] -= A * W[(size_t)j * WD + col];
          }
        }
        for (int i = 0; i < rows; ++i)
          for (int col = 0; col < WD; ++col) {
            const size_t n = bh * c.N + n0 + i;
            const double got = col < c.E ? from_bf16(wv[n * c.E + col]) : from_bf16(wk[n * c.D + col - c.E]);
            err = std::max(err, std::fabs(got - W[(size_t)i * WD + col]));
            big = std::max(big, std::fabs(W[(size_t)i * WD + col]));
          }
      }
      EXPECT_LE(err, 1e-2 * big) << (device ? "device" : "host") << (program_only ? " (program)" : "") << ", b " << b
                                 << ", h " << h << ", N " << c.N << ", D " << c.D << ", E " << c.E;
      worst = std::max(worst, err / big);
    }
  return worst;
}

TEST(DeltaPrep, HostWy16ProgramMatchesDefinitions) {
  unsigned seed = 600;
  for (const Wy16Case& c : kWy16Cases) wy16_case(c, seed++, false);
}

TEST(DeltaPrep, CudaWy16MatchesDefinitions) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 8) GTEST_SKIP() << "tf32 tensor cores need sm_80";
  unsigned seed = 700;
  for (bool program_only : {false, true})
    for (const Wy16Case& c : kWy16Cases) {
      const double e = wy16_case(c, seed++, true, program_only);
      std::printf("wy16 %s N %d D %d E %d kpad %d: largest error / largest entry %.2e\n",
                  program_only ? "program" : "kernel ", c.N, c.D, c.E, c.kpad, e);
    }
}
#endif

}  // namespace
