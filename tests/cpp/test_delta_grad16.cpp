// GoogleTest of the gated delta rule's per-chunk gradients in 16 bits (kernels/delta_grad16.h) on a device, against
// delta_bwd.h's formulas computed in double from the same bf16 inputs, in their unfolded form: the WY form
// W = m^-1 [diag(beta) V | diag(beta pre) K] and dR = m^-T [dU | -dU Sb^T] formed explicitly, m^-1 by substitution,
// dA = -(dR W^T) strictly lower. q, k, v in a (B, N, H, .) memory layout read through head maps (GQA, GVA), dO, U,
// dU (B, H, N, E), Sb and dSe per chunk, partial last chunks, -inf gates (resets), one token, every (D, E) the
// kernel takes, dq, dk, dv in fp32 (B, H, N, .) and in bf16 in a (B, N, H, .) layout.
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

#include "delta_chain_api.h"  // delta_wy16 (m^-1 for the with_minv cases)
#include "delta_grad16.h"
#include "device_buffers.h"

namespace {

struct Grad16Case {
  int B, H, Hq, Hk, Hv, N, D, E;
  bool out16;  // dq, dk, dv in bf16
};
const Grad16Case kGrad16Cases[] = {{1, 2, 2, 2, 2, 200, 128, 128, false},
                                   {2, 4, 1, 2, 4, 64, 64, 64, false},
                                   {1, 2, 2, 1, 1, 1, 128, 64, true},
                                   {1, 4, 1, 1, 4, 300, 64, 128, false},
                                   {1, 2, 2, 2, 2, 130, 128, 128, true}};

double f(__nv_bfloat16 x) { return static_cast<float>(x); }

using Mat = std::vector<std::vector<double>>;
Mat mat(int r, int c) { return Mat(r, std::vector<double>(c, 0.0)); }

// Largest error of each gradient relative to its largest entry.
struct Grad16Errors {
  double dq = 0, dk = 0, dv = 0, dbeta = 0, dg = 0;
};

// with_minv: m^-1 read from what the WY kernel writes for the same k, v, g, beta (Wy16Args::minv), as the op's
// backward reads the forward's, instead of formed in the kernel.
Grad16Errors grad16_case(const Grad16Case& c, unsigned seed, bool with_minv) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  const int C = 64, nc = (c.N + C - 1) / C, D = c.D, E = c.E, B = c.B, H = c.H, N = c.N;
  const double rd = 1.0 / std::sqrt((double)D), scale = rd;
  auto bf = [](double x) { return __float2bfloat16((float)x); };
  std::vector<__nv_bfloat16> q((size_t)B * N * c.Hq * D), k((size_t)B * N * c.Hk * D), v((size_t)B * N * c.Hv * E);
  std::vector<__nv_bfloat16> dout((size_t)B * H * N * E), u(dout.size()), du(dout.size());
  std::vector<__nv_bfloat16> sb((size_t)B * H * nc * D * E), dse(sb.size());
  for (auto& e : q) e = bf(nd(gen) * rd);
  for (auto& e : k) e = bf(nd(gen) * rd);
  for (auto& e : v) e = bf(nd(gen));
  for (auto& e : dout) e = bf(nd(gen));
  for (auto& e : u) e = bf(nd(gen));
  for (auto& e : du) e = bf(nd(gen));
  for (auto& e : sb) e = bf(nd(gen));
  for (auto& e : dse) e = bf(nd(gen));
  std::vector<float> g((size_t)B * H * N), beta(g.size());
  for (size_t i = 0; i < g.size(); ++i) g[i] = i % 41 == 7 ? -INFINITY : (float)(-0.1 * ud(gen));
  for (auto& e : beta) e = (float)ud(gen);
  // memory: q, k, v (B, N, H., .); dO (B, H, N, E)
  const int64_t qs[3] = {(int64_t)N * c.Hq * D, D, (int64_t)c.Hq * D};
  const int64_t ks[3] = {(int64_t)N * c.Hk * D, D, (int64_t)c.Hk * D};
  const int64_t vs[3] = {(int64_t)N * c.Hv * E, E, (int64_t)c.Hv * E};
  const int64_t ds[3] = {(int64_t)H * N * E, (int64_t)N * E, E};
  lasp::cuda::Grad16Args a;
  a.B = B, a.H = H, a.N = N, a.D = D, a.E = E, a.qgroup = H / c.Hq, a.kgroup = H / c.Hk, a.vgroup = H / c.Hv;
  a.scale = (float)scale;
  for (int i = 0; i < 3; ++i) a.qs[i] = qs[i], a.ks[i] = ks[i], a.vs[i] = vs[i], a.ds[i] = ds[i];
  std::vector<float> dq((size_t)B * H * N * D, -7.f), dk(dq.size(), -7.f), dv((size_t)B * H * N * E, -7.f),
      dbeta(g.size(), -7.f), dg(g.size(), -7.f);
  DeviceBuffers<__nv_bfloat16> b16;
  DeviceBuffers<float> b32;
  a.q = b16.up(q), a.k = b16.up(k), a.v = b16.up(v), a.dout = b16.up(dout);
  a.u = b16.up(u), a.du = b16.up(du), a.sb = b16.up(sb), a.dse = b16.up(dse);
  a.g = b32.up(g), a.beta = b32.up(beta);
  float *ddq = b32.up(dq), *ddk = b32.up(dk), *ddv = b32.up(dv), *ddb = b32.up(dbeta), *ddg = b32.up(dg);
  std::vector<__nv_bfloat16> hq(dq.size()), hk(dk.size()), hv(dv.size());  // the bf16 outputs (out16)
  __nv_bfloat16 *eq = b16.up(hq), *ek = b16.up(hk), *ev = b16.up(hv);
  a.dq = ddq, a.dk = ddk, a.dv = ddv, a.dbeta = ddb, a.dg = ddg;
  // fp32 outputs (B, H, N, .); the bf16 ones (out16) in a (B, N, H, .) memory layout
  const int64_t os32[2][3] = {{(int64_t)H * N * D, (int64_t)N * D, D}, {(int64_t)H * N * E, (int64_t)N * E, E}};
  const int64_t os16[2][3] = {{(int64_t)N * H * D, D, (int64_t)H * D}, {(int64_t)N * H * E, E, (int64_t)H * E}};
  const auto& os = c.out16 ? os16 : os32;
  for (int i = 0; i < 3; ++i) a.dqs[i] = a.dks[i] = os[0][i], a.dvs[i] = os[1][i];
  if (c.out16) a.out16 = 7, a.dq = eq, a.dk = ek, a.dv = ev;
  if (with_minv) {
    lasp::cuda::Wy16Args w;
    w.B = B, w.H = H, w.N = N, w.D = D, w.E = E, w.kgroup = a.kgroup, w.vgroup = a.vgroup;
    w.k = a.k, w.v = a.v, w.beta = a.beta, w.g = a.g;
    for (int i = 0; i < 3; ++i) w.ks[i] = ks[i], w.vs[i] = vs[i];
    std::vector<__nv_bfloat16> wv((size_t)B * H * N * E), wk((size_t)B * H * N * D), minv((size_t)B * H * N * C);
    w.wv = b16.up(wv), w.wk = b16.up(wk), w.minv = b16.up(minv);
    EXPECT_TRUE(lasp::cuda::delta_wy16_takes(w));
    EXPECT_EQ(lasp::cuda::delta_wy16(w, nullptr), cudaSuccess);
    a.minv = w.minv;
  }
  EXPECT_TRUE(lasp::cuda::delta_grad16_takes(a));
  EXPECT_EQ(lasp::cuda::delta_grad16(a, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  b32.down(dq, ddq);
  b32.down(dk, ddk);
  b32.down(dv, ddv);
  b32.down(dbeta, ddb);
  b32.down(dg, ddg);
  if (c.out16) {
    b16.down(hq, eq);
    b16.down(hk, ek);
    b16.down(hv, ev);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int n = 0; n < N; ++n) {
          const size_t to = ((size_t)(b * H + h) * N + n), from = ((size_t)(b * N + n) * H + h);
          for (int x = 0; x < D; ++x)
            dq[to * D + x] = static_cast<float>(hq[from * D + x]),
                        dk[to * D + x] = static_cast<float>(hk[from * D + x]);
          for (int e = 0; e < E; ++e) dv[to * E + e] = static_cast<float>(hv[from * E + e]);
        }
  }

  Grad16Errors err, big;
  auto cmp = [](double got, double want, double& e, double& m) {
    e = std::max(e, std::fabs(got - want));
    if (std::isnan(got)) e = INFINITY;
    m = std::max(m, std::fabs(want));
  };
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const size_t bh = (size_t)b * H + h;
      for (int ci = 0; ci < nc; ++ci) {
        const int n0 = ci * C, R = std::min(C, N - n0);
        // the chunk's rows (R of them: the padding contributes nothing)
        Mat Q = mat(R, D), K = mat(R, D), V = mat(R, E), dO = mat(R, E), U = mat(R, E), dU = mat(R, E);
        Mat Sb = mat(D, E), dSe = mat(D, E);
        std::vector<double> gg(R), bb(R);
        for (int i = 0; i < R; ++i) {
          const int64_t n = n0 + i;
          for (int x = 0; x < D; ++x) {
            Q[i][x] = f(q[b * qs[0] + (h / a.qgroup) * qs[1] + n * qs[2] + x]);
            K[i][x] = f(k[b * ks[0] + (h / a.kgroup) * ks[1] + n * ks[2] + x]);
          }
          for (int e = 0; e < E; ++e) {
            V[i][e] = f(v[b * vs[0] + (h / a.vgroup) * vs[1] + n * vs[2] + e]);
            dO[i][e] = f(dout[(bh * N + n) * E + e]);
            U[i][e] = f(u[(bh * N + n) * E + e]);
            dU[i][e] = f(du[(bh * N + n) * E + e]);
          }
          gg[i] = g[bh * N + n];
          bb[i] = beta[bh * N + n];
        }
        for (int x = 0; x < D; ++x)
          for (int e = 0; e < E; ++e) {
            Sb[x][e] = f(sb[((bh * nc + ci) * D + x) * E + e]);
            dSe[x][e] = f(dse[((bh * nc + ci) * D + x) * E + e]);
          }
        auto gsum = [&](int from, int to) {
          double s = 0;
          for (int l = from; l <= to; ++l) s += gg[l];
          return s;
        };
        Mat Gam = mat(R, R), KK = mat(R, R), QK = mat(R, R);
        std::vector<double> pre(R), suf(R);
        for (int i = 0; i < R; ++i) {
          pre[i] = std::exp(gsum(0, i));
          suf[i] = std::exp(gsum(i + 1, R - 1));
          for (int j = 0; j < R; ++j) {
            Gam[i][j] = j <= i ? std::exp(gsum(j + 1, i)) : 0.0;
            for (int x = 0; x < D; ++x) KK[i][j] += K[i][x] * K[j][x], QK[i][j] += Q[i][x] * K[j][x];
          }
        }
        Mat Mi = mat(R, R);  // (I + A)^-1 by substitution down each column
        for (int j = 0; j < R; ++j)
          for (int i = j; i < R; ++i) {
            double x = i == j ? 1.0 : 0.0;
            for (int l = j; l < i; ++l) x -= bb[i] * Gam[i][l] * KK[i][l] * Mi[l][j];
            Mi[i][j] = x;
          }
        const int WD = E + D;
        Mat W = mat(R, WD), dW = mat(R, WD), dR = mat(R, WD);
        for (int i = 0; i < R; ++i)
          for (int l = 0; l <= i; ++l) {
            for (int e = 0; e < E; ++e) W[i][e] += Mi[i][l] * bb[l] * V[l][e];
            for (int x = 0; x < D; ++x) W[i][E + x] += Mi[i][l] * bb[l] * pre[l] * K[l][x];
          }
        for (int i = 0; i < R; ++i) {
          for (int e = 0; e < E; ++e) dW[i][e] = dU[i][e];
          for (int x = 0; x < D; ++x) {
            double s = 0;
            for (int e = 0; e < E; ++e) s += dU[i][e] * Sb[x][e];
            dW[i][E + x] = -s;
          }
        }
        for (int i = 0; i < R; ++i)
          for (int l = i; l < R; ++l)
            for (int y = 0; y < WD; ++y) dR[i][y] += Mi[l][i] * dW[l][y];
        Mat dA = mat(R, R), dP = mat(R, R), Y1 = mat(R, D), Y2 = mat(R, D);
        for (int i = 0; i < R; ++i)
          for (int j = 0; j < R; ++j) {
            if (j < i)
              for (int y = 0; y < WD; ++y) dA[i][j] -= dR[i][y] * W[j][y];
            if (j <= i) {
              double s = 0;
              for (int e = 0; e < E; ++e) s += dO[i][e] * U[j][e];
              dP[i][j] = scale * s * Gam[i][j];
            }
          }
        for (int i = 0; i < R; ++i)
          for (int x = 0; x < D; ++x)
            for (int e = 0; e < E; ++e) Y1[i][x] += dO[i][e] * Sb[x][e], Y2[i][x] += U[i][e] * dSe[x][e];
        double sdse = 0;
        for (int x = 0; x < D; ++x)
          for (int e = 0; e < E; ++e) sdse += dSe[x][e] * Sb[x][e];
        std::vector<double> Xp(R), Xs(R);
        Mat XG = mat(R, R);
        for (int i = 0; i < R; ++i) {
          const size_t row = bh * N + n0 + i;
          double rk = 0, rv = 0, ra = 0, p1 = 0, p2 = 0;
          for (int x = 0; x < D; ++x) {
            double dqx = scale * pre[i] * Y1[i][x], dkx = suf[i] * Y2[i][x] + bb[i] * pre[i] * dR[i][E + x];
            for (int j = 0; j < R; ++j) {
              dqx += dP[i][j] * K[j][x];
              dkx +=
                  bb[i] * dA[i][j] * Gam[i][j] * K[j][x] + bb[j] * dA[j][i] * Gam[j][i] * K[j][x] + dP[j][i] * Q[j][x];
            }
            cmp(dq[row * D + x], dqx, err.dq, big.dq);
            cmp(dk[row * D + x], dkx, err.dk, big.dk);
            rk += dR[i][E + x] * K[i][x];
            p1 += Q[i][x] * Y1[i][x];
            p2 += K[i][x] * Y2[i][x];
          }
          for (int e = 0; e < E; ++e) {
            cmp(dv[row * E + e], bb[i] * dR[i][e], err.dv, big.dv);
            rv += dR[i][e] * V[i][e];
          }
          for (int j = 0; j < i; ++j) ra += dA[i][j] * Gam[i][j] * KK[i][j];
          cmp(dbeta[row], rv + pre[i] * rk + ra, err.dbeta, big.dbeta);
          Xp[i] = pre[i] * (scale * p1 + bb[i] * rk + (i == R - 1 ? sdse : 0.0));
          Xs[i] = suf[i] * p2;
          for (int j = 0; j < i; ++j) XG[i][j] = dP[i][j] * QK[i][j] + bb[i] * dA[i][j] * Gam[i][j] * KK[i][j];
        }
        for (int t = 0; t < R; ++t) {
          double s = 0;
          for (int i = t; i < R; ++i) s += Xp[i];
          for (int j = 0; j < t; ++j) {
            s += Xs[j];
            for (int i = t; i < R; ++i) s += XG[i][j];
          }
          cmp(dg[bh * N + n0 + t], s, err.dg, big.dg);
        }
      }
    }
  auto rel = [](double e, double m) { return e / std::max(m, 1e-30); };
  return {rel(err.dq, big.dq), rel(err.dk, big.dk), rel(err.dv, big.dv), rel(err.dbeta, big.dbeta),
          rel(err.dg, big.dg)};
}

// The 16-bit operands formed in the kernel (m^-1, dP, dWk, dRk, dRv, X, dkk: bf16, 2^-9 relative) against the
// formulas in double: within 2e-2 of each gradient's largest entry.
TEST(DeltaGrad16, CudaGradientsMatchFormulas) {
  LASP_SKIP_WITHOUT_CUDA_DEVICE();
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  if (major < 8) GTEST_SKIP() << "16-bit mma.sync needs sm_80";
  unsigned seed = 1200;
  for (bool with_minv : {false, true})
    for (const Grad16Case& c : kGrad16Cases) {
      const Grad16Errors e = grad16_case(c, seed++, with_minv);
      std::printf(
          "grad16 B %d H %d (q %d, k %d, v %d) N %d D %d E %d%s%s: relative errors dq %.2e dk %.2e dv %.2e "
          "dbeta %.2e dg %.2e\n",
          c.B, c.H, c.Hq, c.Hk, c.Hv, c.N, c.D, c.E, c.out16 ? " (bf16 out)" : "", with_minv ? " (m^-1 given)" : "",
          e.dq, e.dk, e.dv, e.dbeta, e.dg);
      const char* what = with_minv ? "m^-1 given, N, D, E = " : "N, D, E = ";
      EXPECT_LE(e.dq, 2e-2) << "dq, " << what << c.N << ", " << c.D << ", " << c.E;
      EXPECT_LE(e.dk, 2e-2) << "dk, " << what << c.N << ", " << c.D << ", " << c.E;
      EXPECT_LE(e.dv, 2e-2) << "dv, " << what << c.N << ", " << c.D << ", " << c.E;
      EXPECT_LE(e.dbeta, 2e-2) << "dbeta, " << what << c.N << ", " << c.D << ", " << c.E;
      EXPECT_LE(e.dg, 2e-2) << "dg, " << what << c.N << ", " << c.D << ", " << c.E;
    }
}

TEST(DeltaGrad16, RefusesShapesItDoesNotTake) {
  lasp::cuda::Grad16Args a;
  a.B = 1, a.H = 1, a.N = 64, a.D = 96, a.E = 64;
  alignas(16) static float x[4];
  a.g = a.beta = x;
  a.dq = a.dk = a.dv = a.dbeta = a.dg = x;
  EXPECT_FALSE(lasp::cuda::delta_grad16_takes(a));  // D = 96
  a.D = 64, a.E = 256;
  EXPECT_FALSE(lasp::cuda::delta_grad16_takes(a));  // E = 256
  a.dqs[2] = a.dks[2] = 64, a.dvs[2] = 64;
  a.E = 64, a.qs[2] = 3;
  EXPECT_FALSE(lasp::cuda::delta_grad16_takes(a));  // q's rows off 16-byte boundaries
  a.qs[2] = 64;
  EXPECT_TRUE(lasp::cuda::delta_grad16_takes(a));  // null 16-bit pointers are on 16-byte boundaries
  a.D = 96;
  EXPECT_EQ(lasp::cuda::delta_grad16(a, nullptr), cudaErrorInvalidValue);
}

}  // namespace

#endif  // LASP_WITH_CUDA
