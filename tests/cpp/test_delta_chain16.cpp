// GoogleTest of the gated delta rule's two 16-bit chains (kernels/delta_chain16.h) on a device, against the chains
// computed directly in double from the same bf16 inputs. The forward chain: U per token, Sb per chunk and the
// final state; the reverse chain: dU per token, dSe per chunk and dS0. q and k in a (B, N, H, D) memory layout
// read through head maps, W_k, W_v and dO (B, H, N, .), partial last chunks, -inf gates (resets), one token, with
// and without the incoming state (forward) or the final state's cotangent (reverse), both E tiles.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#if defined(LASP_WITH_CUDA)
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "delta_chain16.h"
#include "device_buffers.h"

namespace {

struct Rev16Case {
  int B, H, Hq, Hk, N, D, E;
  bool end_grad;
};
const Rev16Case kRev16Cases[] = {{1, 2, 2, 2, 200, 128, 128, true},
                                 {2, 4, 1, 2, 64, 64, 64, false},
                                 {1, 2, 2, 1, 1, 128, 64, true},
                                 {1, 2, 2, 2, 300, 64, 128, true}};

double f(__nv_bfloat16 x) { return static_cast<float>(x); }

// Largest error of each output relative to the output's largest entry.
struct Rev16Errors {
  double du = 0, dse = 0, ds0 = 0;
};

Rev16Errors rev16_case(const Rev16Case& c, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  const int C = 64, nc = (c.N + C - 1) / C, D = c.D, E = c.E;
  const double rd = 1.0 / std::sqrt((double)D), scale = rd;
  auto bf = [](double x) { return __float2bfloat16((float)x); };
  std::vector<__nv_bfloat16> q((size_t)c.B * c.N * c.Hq * D), k((size_t)c.B * c.N * c.Hk * D);
  std::vector<__nv_bfloat16> wk((size_t)c.B * c.H * c.N * D), dout((size_t)c.B * c.H * c.N * E);
  for (auto& e : q) e = bf(nd(gen) * rd);
  for (auto& e : k) e = bf(nd(gen) * rd);
  for (auto& e : wk) e = bf(0.5 * nd(gen) * rd);
  for (auto& e : dout) e = bf(nd(gen));
  std::vector<float> g((size_t)c.B * c.H * c.N), dend((size_t)c.B * c.H * D * E);
  for (size_t i = 0; i < g.size(); ++i) g[i] = i % 41 == 7 ? -INFINITY : (float)(-0.1 * ud(gen));
  for (auto& e : dend) e = (float)nd(gen);
  // memory: q (B, N, Hq, D), k (B, N, Hk, D), W_k and dO (B, H, N, .)
  const int64_t qs[3] = {(int64_t)c.N * c.Hq * D, D, (int64_t)c.Hq * D};
  const int64_t ks[3] = {(int64_t)c.N * c.Hk * D, D, (int64_t)c.Hk * D};
  const int64_t ds[3] = {(int64_t)c.H * c.N * E, (int64_t)c.N * E, E};
  lasp::cuda::Rev16Args a;
  a.B = c.B, a.H = c.H, a.N = c.N, a.D = D, a.E = E, a.qgroup = c.H / c.Hq, a.kgroup = c.H / c.Hk;
  a.scale = (float)scale;
  for (int i = 0; i < 3; ++i) a.qs[i] = qs[i], a.ks[i] = ks[i], a.ds[i] = ds[i];
  const __nv_bfloat16 junk = __float2bfloat16(-7.f);
  std::vector<__nv_bfloat16> du((size_t)c.B * c.H * c.N * E, junk), dse((size_t)c.B * c.H * nc * D * E, junk);
  std::vector<float> ds0((size_t)c.B * c.H * D * E, -7.f);
  DeviceBuffers<__nv_bfloat16> b16;
  DeviceBuffers<float> b32;
  a.q = b16.up(q), a.k = b16.up(k), a.wk = b16.up(wk), a.dout = b16.up(dout);
  a.g = b32.up(g);
  a.dS_end = c.end_grad ? b32.up(dend) : nullptr;
  __nv_bfloat16* ddu = b16.up(du);
  __nv_bfloat16* ddse = b16.up(dse);
  float* dds0 = b32.up(ds0);
  a.du = ddu, a.dse = ddse, a.dS0 = dds0;
  EXPECT_TRUE(lasp::cuda::delta_rev16_takes(a));
  EXPECT_EQ(lasp::cuda::delta_rev16(a, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  b16.down(du, ddu);
  b16.down(dse, ddse);
  b32.down(ds0, dds0);

  Rev16Errors err, big;
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.H; ++h) {
      const size_t bh = (size_t)b * c.H + h;
      auto qx = [&](int n, int x) { return f(q[b * qs[0] + (h / a.qgroup) * qs[1] + (int64_t)n * qs[2] + x]); };
      auto kx = [&](int n, int x) { return f(k[b * ks[0] + (h / a.kgroup) * ks[1] + (int64_t)n * ks[2] + x]); };
      auto wx = [&](int n, int x) { return f(wk[(bh * c.N + n) * D + x]); };
      auto dx = [&](int n, int e) { return f(dout[(bh * c.N + n) * E + e]); };
      std::vector<double> G((size_t)D * E, 0.0);
      if (c.end_grad)
        for (int i = 0; i < D * E; ++i) G[i] = dend[bh * D * E + i];
      for (int ci = nc - 1; ci >= 0; --ci) {
        const int n0 = ci * C, rows = std::min(C, c.N - n0);
        for (int i = 0; i < D * E; ++i) {
          const double got = f(dse[(bh * nc + ci) * D * E + i]);
          err.dse = std::max(err.dse, std::fabs(got - G[i]));
          big.dse = std::max(big.dse, std::fabs(G[i]));
        }
        auto gsum = [&](int from, int to) {  // g[from] + ... + g[to] within the chunk
          double s = 0;
          for (int u = from; u <= to; ++u) s += g[bh * c.N + n0 + u];
          return s;
        };
        std::vector<double> dU((size_t)rows * E, 0.0);
        for (int j = 0; j < rows; ++j) {
          const double suf = std::exp(gsum(j + 1, rows - 1));
          for (int e = 0; e < E; ++e) {
            double s = 0;
            for (int x = 0; x < D; ++x) s += kx(n0 + j, x) * G[(size_t)x * E + e];
            dU[(size_t)j * E + e] = suf * s;
          }
          for (int i = j; i < rows; ++i) {
            double qk = 0;
            for (int x = 0; x < D; ++x) qk += qx(n0 + i, x) * kx(n0 + j, x);
            const double p = scale * qk * std::exp(gsum(j + 1, i));
            for (int e = 0; e < E; ++e) dU[(size_t)j * E + e] += p * dx(n0 + i, e);
          }
          for (int e = 0; e < E; ++e) {
            const double got = f(du[(bh * c.N + n0 + j) * E + e]);
            err.du = std::max(err.du, std::fabs(got - dU[(size_t)j * E + e]));
            big.du = std::max(big.du, std::fabs(dU[(size_t)j * E + e]));
          }
        }
        const double plast = std::exp(gsum(0, rows - 1));
        std::vector<double> next((size_t)D * E);
        for (int x = 0; x < D; ++x)
          for (int e = 0; e < E; ++e) {
            double s = plast * G[(size_t)x * E + e];
            for (int i = 0; i < rows; ++i)
              s += scale * std::exp(gsum(0, i)) * qx(n0 + i, x) * dx(n0 + i, e) - wx(n0 + i, x) * dU[(size_t)i * E + e];
            next[(size_t)x * E + e] = s;
          }
        G.swap(next);
      }
      for (int i = 0; i < D * E; ++i) {
        err.ds0 = std::max(err.ds0, std::fabs(ds0[bh * D * E + i] - G[i]));
        big.ds0 = std::max(big.ds0, std::fabs(G[i]));
      }
    }
  return {err.du / std::max(big.du, 1e-30), err.dse / std::max(big.dse, 1e-30), err.ds0 / std::max(big.ds0, 1e-30)};
}

// The 16-bit operands (G, P^T, the scaled dO, dU: bf16, 2^-9 relative) against the chain in double: within 2e-2
// of each output's largest entry.
TEST(DeltaChain16, CudaReverseMatchesChain) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 8) GTEST_SKIP() << "16-bit mma.sync needs sm_80";
  unsigned seed = 900;
  for (const Rev16Case& c : kRev16Cases) {
    const Rev16Errors e = rev16_case(c, seed++);
    std::printf("rev16 B %d H %d (q %d, k %d) N %d D %d E %d%s: relative errors dU %.2e dSe %.2e dS0 %.2e\n", c.B, c.H,
                c.Hq, c.Hk, c.N, c.D, c.E, c.end_grad ? ", dS_end" : "", e.du, e.dse, e.ds0);
    EXPECT_LE(e.du, 2e-2) << "dU, N " << c.N << ", D " << c.D << ", E " << c.E;
    EXPECT_LE(e.dse, 2e-2) << "dSe, N " << c.N << ", D " << c.D << ", E " << c.E;
    EXPECT_LE(e.ds0, 2e-2) << "dS0, N " << c.N << ", D " << c.D << ", E " << c.E;
  }
}

// The forward chain (delta_states16) on the same cases (end_grad: an incoming state), errors relative to each
// output's largest entry.
Rev16Errors states16_case(const Rev16Case& c, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  const int C = 64, nc = (c.N + C - 1) / C, D = c.D, E = c.E;
  const double rd = 1.0 / std::sqrt((double)D);
  auto bf = [](double x) { return __float2bfloat16((float)x); };
  std::vector<__nv_bfloat16> k((size_t)c.B * c.N * c.Hk * D), wk((size_t)c.B * c.H * c.N * D),
      wv((size_t)c.B * c.H * c.N * E);
  for (auto& e : k) e = bf(nd(gen) * rd);
  for (auto& e : wk) e = bf(0.5 * nd(gen) * rd);
  for (auto& e : wv) e = bf(nd(gen));
  std::vector<float> g((size_t)c.B * c.H * c.N), s0((size_t)c.B * c.H * D * E);
  for (size_t i = 0; i < g.size(); ++i) g[i] = i % 41 == 7 ? -INFINITY : (float)(-0.1 * ud(gen));
  for (auto& e : s0) e = (float)nd(gen);
  const int64_t ks[3] = {(int64_t)c.N * c.Hk * D, D, (int64_t)c.Hk * D};  // (B, N, Hk, D) memory
  lasp::cuda::States16Args a;
  a.B = c.B, a.H = c.H, a.N = c.N, a.D = D, a.E = E, a.kgroup = c.H / c.Hk;
  for (int i = 0; i < 3; ++i) a.ks[i] = ks[i];
  const __nv_bfloat16 junk = __float2bfloat16(-7.f);
  std::vector<__nv_bfloat16> u((size_t)c.B * c.H * c.N * E, junk), sb((size_t)c.B * c.H * nc * D * E, junk);
  std::vector<float> fin((size_t)c.B * c.H * D * E, -7.f);
  DeviceBuffers<__nv_bfloat16> b16;
  DeviceBuffers<float> b32;
  a.k = b16.up(k), a.wk = b16.up(wk), a.wv = b16.up(wv);
  a.g = b32.up(g);
  a.S0 = c.end_grad ? b32.up(s0) : nullptr;
  __nv_bfloat16* du = b16.up(u);
  __nv_bfloat16* dsb = b16.up(sb);
  float* dfin = b32.up(fin);
  a.u = du, a.sb = dsb, a.fin = dfin;
  EXPECT_TRUE(lasp::cuda::delta_states16_takes(a));
  EXPECT_EQ(lasp::cuda::delta_states16(a, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  b16.down(u, du);
  b16.down(sb, dsb);
  b32.down(fin, dfin);

  Rev16Errors err, big;
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.H; ++h) {
      const size_t bh = (size_t)b * c.H + h;
      auto kx = [&](int n, int x) { return f(k[b * ks[0] + (h / a.kgroup) * ks[1] + (int64_t)n * ks[2] + x]); };
      std::vector<double> S((size_t)D * E, 0.0);
      if (c.end_grad)
        for (int i = 0; i < D * E; ++i) S[i] = s0[bh * D * E + i];
      for (int ci = 0; ci < nc; ++ci) {
        const int n0 = ci * C, rows = std::min(C, c.N - n0);
        for (int i = 0; i < D * E; ++i) {
          err.dse = std::max(err.dse, std::fabs(f(sb[(bh * nc + ci) * D * E + i]) - S[i]));
          big.dse = std::max(big.dse, std::fabs(S[i]));
        }
        auto gsum = [&](int from, int to) {
          double s = 0;
          for (int x = from; x <= to; ++x) s += g[bh * c.N + n0 + x];
          return s;
        };
        std::vector<double> U((size_t)rows * E);
        for (int i = 0; i < rows; ++i)
          for (int e = 0; e < E; ++e) {
            double x = f(wv[(bh * c.N + n0 + i) * E + e]);
            for (int y = 0; y < D; ++y) x -= f(wk[(bh * c.N + n0 + i) * D + y]) * S[(size_t)y * E + e];
            U[(size_t)i * E + e] = x;
            err.du = std::max(err.du, std::fabs(f(u[(bh * c.N + n0 + i) * E + e]) - x));
            big.du = std::max(big.du, std::fabs(x));
          }
        const double plast = std::exp(gsum(0, rows - 1));
        for (int i = 0; i < D * E; ++i) S[i] *= plast;
        for (int i = 0; i < rows; ++i) {
          const double suf = std::exp(gsum(i + 1, rows - 1));
          for (int y = 0; y < D; ++y) {
            const double ky = suf * kx(n0 + i, y);
            for (int e = 0; e < E; ++e) S[(size_t)y * E + e] += ky * U[(size_t)i * E + e];
          }
        }
      }
      for (int i = 0; i < D * E; ++i) {
        err.ds0 = std::max(err.ds0, std::fabs(fin[bh * D * E + i] - S[i]));
        big.ds0 = std::max(big.ds0, std::fabs(S[i]));
      }
    }
  return {err.du / std::max(big.du, 1e-30), err.dse / std::max(big.dse, 1e-30), err.ds0 / std::max(big.ds0, 1e-30)};
}

// The 16-bit operands (S, diag(suf) U: bf16) against the chain in double: within 2e-2 of each output's largest
// entry.
TEST(DeltaChain16, CudaStatesMatchChain) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 8) GTEST_SKIP() << "16-bit mma.sync needs sm_80";
  unsigned seed = 950;
  for (const Rev16Case& c : kRev16Cases) {
    const Rev16Errors e = states16_case(c, seed++);
    std::printf("states16 B %d H %d (k %d) N %d D %d E %d%s: relative errors U %.2e Sb %.2e final %.2e\n", c.B, c.H,
                c.Hk, c.N, c.D, c.E, c.end_grad ? ", S0" : "", e.du, e.dse, e.ds0);
    EXPECT_LE(e.du, 2e-2) << "U, N " << c.N << ", D " << c.D << ", E " << c.E;
    EXPECT_LE(e.dse, 2e-2) << "Sb, N " << c.N << ", D " << c.D << ", E " << c.E;
    EXPECT_LE(e.ds0, 2e-2) << "final, N " << c.N << ", D " << c.D << ", E " << c.E;
  }
}

// Shapes the kernels do not take are refused (no launch): D outside {64, 128}, E not a multiple of 64, rows
// off 16-byte boundaries.
TEST(DeltaChain16, RefusesShapesItDoesNotTake) {
  lasp::cuda::Rev16Args a;
  a.B = 1, a.H = 1, a.N = 10, a.D = 128, a.E = 64;
  alignas(16) static float dummy[64];
  a.q = a.k = a.wk = a.dout = dummy;
  a.du = a.dse = dummy;
  a.dS0 = dummy;
  a.qs[0] = a.ks[0] = a.ds[0] = 1280, a.qs[1] = a.ks[1] = a.ds[1] = 1280, a.qs[2] = a.ks[2] = 128, a.ds[2] = 64;
  EXPECT_TRUE(lasp::cuda::delta_rev16_takes(a));
  a.D = 96;
  EXPECT_FALSE(lasp::cuda::delta_rev16_takes(a));
  a.D = 128, a.E = 96;
  EXPECT_FALSE(lasp::cuda::delta_rev16_takes(a));
  a.E = 64, a.qs[2] = 130;
  EXPECT_FALSE(lasp::cuda::delta_rev16_takes(a));
  EXPECT_EQ(lasp::cuda::delta_rev16(a, nullptr), cudaErrorInvalidValue);
  lasp::cuda::States16Args s;
  s.B = 1, s.H = 1, s.N = 10, s.D = 64, s.E = 128;
  s.k = s.wk = s.wv = dummy;
  s.u = s.sb = dummy;
  s.fin = dummy;
  s.ks[0] = s.ks[1] = 640, s.ks[2] = 64;
  EXPECT_TRUE(lasp::cuda::delta_states16_takes(s));
  s.E = 32;
  EXPECT_FALSE(lasp::cuda::delta_states16_takes(s));
  s.E = 128, s.ks[2] = 66;
  EXPECT_FALSE(lasp::cuda::delta_states16_takes(s));
  EXPECT_EQ(lasp::cuda::delta_states16(s, nullptr), cudaErrorInvalidValue);
}

}  // namespace
#endif
