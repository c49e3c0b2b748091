// GoogleTest of the CPU building blocks, driven through AttnParams alone (no torch tensors), against
// the direct O(N^2) sums of lasp_params.h computed here in double.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cpu/attention_cpu.h"
#include "lasp_params.h"

namespace {

using lasp::AttnParams;

struct Problem {
  int64_t B = 2, H = 4, Hkv = 2, N = 70, D = 5, E = 7;
  bool decay = true;
  std::vector<double> q, k, v, dout, s_in, g, lambda;
  explicit Problem(int64_t n, bool with_decay, unsigned seed, int64_t hkv = 2) : N(n), decay(with_decay) {
    Hkv = hkv;
    std::mt19937 gen(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    auto fill = [&](std::vector<double>& x, size_t n_) { x.resize(n_); for (auto& e : x) e = nd(gen); };
    fill(q, B * H * N * D);
    fill(k, B * Hkv * N * D);
    fill(v, B * Hkv * N * E);
    fill(dout, B * H * N * E);
    fill(s_in, B * H * D * E);
    fill(g, B * H * D * E);
    lambda.resize(H);
    for (int64_t h = 0; h < H; ++h) lambda[h] = decay ? 0.05 * (h + 1) : 0.0;
  }
  double Q(int64_t b, int64_t h, int64_t t, int64_t i) const { return q[((b * H + h) * N + t) * D + i]; }
  double K(int64_t b, int64_t h, int64_t t, int64_t i) const { return k[((b * Hkv + h) * N + t) * D + i]; }
  double V(int64_t b, int64_t h, int64_t t, int64_t j) const { return v[((b * Hkv + h) * N + t) * E + j]; }
  double dO(int64_t b, int64_t h, int64_t t, int64_t j) const { return dout[((b * H + h) * N + t) * E + j]; }
};

lasp::TensorView4 dense(void* ptr, int64_t H, int64_t N, int64_t W) {
  lasp::TensorView4 t;
  t.ptr = ptr;
  t.stride[0] = H * N * W;
  t.stride[1] = N * W;
  t.stride[2] = W;
  t.stride[3] = 1;
  return t;
}

double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

AttnParams params_for(Problem& pr) {
  AttnParams p;
  p.dtype = lasp::ScalarType::Float64;
  p.B = pr.B; p.H = pr.H; p.Hkv = pr.Hkv; p.N = pr.N; p.D = pr.D; p.E = pr.E;
  p.scale = 0.7;
  p.decay = pr.decay ? pr.lambda.data() : nullptr;
  p.q = dense(pr.q.data(), pr.H, pr.N, pr.D);
  p.k = dense(pr.k.data(), pr.Hkv, pr.N, pr.D);
  p.v = dense(pr.v.data(), pr.Hkv, pr.N, pr.E);
  p.dout = dense(pr.dout.data(), pr.H, pr.N, pr.E);
  return p;
}

// Direct sums, in double.
void reference(const Problem& pr, double scale, std::vector<double>& o, std::vector<double>& s_out,
               std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv, std::vector<double>& ds_in) {
  const int64_t B = pr.B, H = pr.H, N = pr.N, D = pr.D, E = pr.E, G = pr.H / pr.Hkv;
  o.assign(B * H * N * E, 0); s_out.assign(B * H * D * E, 0); dq.assign(B * H * N * D, 0);
  dk.assign(B * pr.Hkv * N * D, 0); dv.assign(B * pr.Hkv * N * E, 0); ds_in.assign(B * H * D * E, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / G;
      const double lam = pr.lambda[h];
      auto gp = [&](int64_t n) { return std::exp(-lam * n); };
      const double* S = &pr.s_in[(b * H + h) * D * E];
      const double* Gr = &pr.g[(b * H + h) * D * E];
      for (int64_t t = 0; t < N; ++t) {
        for (int64_t j = 0; j < E; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < D; ++i) acc += gp(t + 1) * pr.Q(b, h, t, i) * S[i * E + j];
          for (int64_t s = 0; s <= t; ++s) {
            double qk = 0;
            for (int64_t i = 0; i < D; ++i) qk += pr.Q(b, h, t, i) * pr.K(b, g, s, i);
            acc += gp(t - s) * qk * pr.V(b, g, s, j);
          }
          o[((b * H + h) * N + t) * E + j] = scale * acc;
        }
      }
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j < E; ++j) {
          double acc = gp(N) * S[i * E + j];
          for (int64_t s = 0; s < N; ++s) acc += gp(N - 1 - s) * pr.K(b, g, s, i) * pr.V(b, g, s, j);
          s_out[(b * H + h) * D * E + i * E + j] = acc;
          double m = gp(N) * Gr[i * E + j];
          for (int64_t t = 0; t < N; ++t) m += scale * gp(t + 1) * pr.Q(b, h, t, i) * pr.dO(b, h, t, j);
          ds_in[(b * H + h) * D * E + i * E + j] = m;
        }
      for (int64_t t = 0; t < N; ++t)
        for (int64_t i = 0; i < D; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < E; ++j) acc += gp(t + 1) * pr.dO(b, h, t, j) * S[i * E + j];
          for (int64_t s = 0; s <= t; ++s) {
            double dv_ = 0;
            for (int64_t j = 0; j < E; ++j) dv_ += pr.dO(b, h, t, j) * pr.V(b, g, s, j);
            acc += gp(t - s) * dv_ * pr.K(b, g, s, i);
          }
          dq[((b * H + h) * N + t) * D + i] = scale * acc;
        }
      for (int64_t s = 0; s < N; ++s) {
        for (int64_t i = 0; i < D; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < E; ++j) acc += gp(N - 1 - s) * pr.V(b, g, s, j) * Gr[i * E + j];
          for (int64_t t = s; t < N; ++t) {
            double dv_ = 0;
            for (int64_t j = 0; j < E; ++j) dv_ += pr.dO(b, h, t, j) * pr.V(b, g, s, j);
            acc += scale * gp(t - s) * dv_ * pr.Q(b, h, t, i);
          }
          dk[((b * pr.Hkv + g) * N + s) * D + i] += acc;
        }
        for (int64_t j = 0; j < E; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < D; ++i) acc += gp(N - 1 - s) * pr.K(b, g, s, i) * Gr[i * E + j];
          for (int64_t t = s; t < N; ++t) {
            double qk = 0;
            for (int64_t i = 0; i < D; ++i) qk += pr.Q(b, h, t, i) * pr.K(b, g, s, i);
            acc += scale * gp(t - s) * qk * pr.dO(b, h, t, j);
          }
          dv[((b * pr.Hkv + g) * N + s) * E + j] += acc;
        }
      }
    }
}

class CpuKernels : public ::testing::TestWithParam<std::tuple<int64_t, bool, int64_t>> {};

TEST_P(CpuKernels, FusedForwardAndBackwardMatchDirectSums) {
  const auto [N, with_decay, hkv] = GetParam();
  Problem pr(N, with_decay, 1234u + static_cast<unsigned>(N), hkv);
  AttnParams p = params_for(pr);
  std::vector<double> o(pr.B * pr.H * N * pr.E, NAN), s_out(pr.B * pr.H * pr.D * pr.E, NAN);
  std::vector<double> dq(pr.q.size(), NAN), dk(pr.k.size(), NAN), dv(pr.v.size(), NAN), ds(s_out.size(), NAN);
  p.o = dense(o.data(), pr.H, N, pr.E);
  p.dq = dense(dq.data(), pr.H, N, pr.D);
  p.dk = dense(dk.data(), pr.Hkv, N, pr.D);
  p.dv = dense(dv.data(), pr.Hkv, N, pr.E);
  p.state_in = pr.s_in.data();
  p.state_out = s_out.data();
  p.grad_state_out = pr.g.data();
  p.grad_state_in = ds.data();
  lasp::cpu::fwd(p);
  lasp::cpu::bwd(p);
  std::vector<double> ro, rs, rdq, rdk, rdv, rds;
  reference(pr, p.scale, ro, rs, rdq, rdk, rdv, rds);
  EXPECT_LT(rel_err(o, ro), 1e-12);
  EXPECT_LT(rel_err(s_out, rs), 1e-12);
  EXPECT_LT(rel_err(dq, rdq), 1e-12);
  EXPECT_LT(rel_err(dk, rdk), 1e-12);
  EXPECT_LT(rel_err(dv, rdv), 1e-12);
  EXPECT_LT(rel_err(ds, rds), 1e-12);
}

// The LASP split: the local states L and M (no incoming state, no outgoing gradient), then the main
// passes with S_in and G (local_ready), give the fused results; S_out = gamma^N S_in + L and
// dS_in = gamma^N G + M.
TEST_P(CpuKernels, LocalThenMainEqualsFused) {
  const auto [N, with_decay, hkv] = GetParam();
  Problem pr(N, with_decay, 99u + static_cast<unsigned>(N), hkv);
  AttnParams p = params_for(pr);
  std::vector<double> o(pr.B * pr.H * N * pr.E), local(pr.B * pr.H * pr.D * pr.E);
  std::vector<double> dq(pr.q.size()), dk(pr.k.size()), dv(pr.v.size()), m(local.size());
  p.o = dense(o.data(), pr.H, N, pr.E);
  p.dq = dense(dq.data(), pr.H, N, pr.D);
  p.dk = dense(dk.data(), pr.Hkv, N, pr.D);
  p.dv = dense(dv.data(), pr.Hkv, N, pr.E);
  p.state_in = nullptr;
  p.state_out = local.data();
  lasp::cpu::fwd_local(p);  // L
  p.state_in = pr.s_in.data();
  p.state_out = nullptr;
  p.local_ready = true;
  lasp::cpu::fwd(p);  // o with S_in
  p.grad_state_out = nullptr;
  p.grad_state_in = m.data();
  lasp::cpu::bwd_local(p);  // M
  lasp::cpu::bwd_prepare(p);
  p.grad_state_out = pr.g.data();
  p.grad_state_in = nullptr;
  lasp::cpu::bwd(p);  // dq, dk, dv with S_in and G

  std::vector<double> ro, rs, rdq, rdk, rdv, rds;
  reference(pr, p.scale, ro, rs, rdq, rdk, rdv, rds);
  EXPECT_LT(rel_err(o, ro), 1e-12);
  EXPECT_LT(rel_err(dq, rdq), 1e-12);
  EXPECT_LT(rel_err(dk, rdk), 1e-12);
  EXPECT_LT(rel_err(dv, rdv), 1e-12);
  // S_out = gamma^N S_in + L and dS_in = gamma^N G + M.
  for (int64_t b = 0; b < pr.B; ++b)
    for (int64_t h = 0; h < pr.H; ++h)
      for (int64_t x = 0; x < pr.D * pr.E; ++x) {
        const int64_t idx = (b * pr.H + h) * pr.D * pr.E + x;
        const double gn = std::exp(-pr.lambda[h] * N);
        EXPECT_NEAR(gn * pr.s_in[idx] + local[idx], rs[idx], 1e-9 * (1 + std::abs(rs[idx])));
        EXPECT_NEAR(gn * pr.g[idx] + m[idx], rds[idx], 1e-9 * (1 + std::abs(rds[idx])));
      }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuKernels,
                         ::testing::Combine(::testing::Values(int64_t{1}, int64_t{63}, int64_t{64}, int64_t{65},
                                                              int64_t{150}),
                                            ::testing::Bool(), ::testing::Values(int64_t{1}, int64_t{2})));

TEST(CpuKernels, Float32StridedViewMatchesDouble) {
  // (B, N, H, D) memory read through strides, in float32, against the double kernel on dense data.
  Problem pr(77, true, 7u);
  const int64_t B = pr.B, H = pr.H, Hkv = pr.Hkv, N = pr.N, D = pr.D, E = pr.E;
  std::vector<float> q(B * N * H * D), k(B * N * Hkv * D), v(B * N * Hkv * E), o(B * N * H * E, NAN);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D; ++i) q[((b * N + t) * H + h) * D + i] = static_cast<float>(pr.Q(b, h, t, i));
      for (int64_t h = 0; h < Hkv; ++h) {
        for (int64_t i = 0; i < D; ++i) k[((b * N + t) * Hkv + h) * D + i] = static_cast<float>(pr.K(b, h, t, i));
        for (int64_t j = 0; j < E; ++j) v[((b * N + t) * Hkv + h) * E + j] = static_cast<float>(pr.V(b, h, t, j));
      }
    }
  auto bnhd = [&](void* ptr, int64_t heads, int64_t w) {
    lasp::TensorView4 t;
    t.ptr = ptr;
    t.stride[0] = N * heads * w;
    t.stride[1] = w;
    t.stride[2] = heads * w;
    t.stride[3] = 1;
    return t;
  };
  std::vector<float> lam(pr.lambda.begin(), pr.lambda.end());
  AttnParams p;
  p.dtype = lasp::ScalarType::Float32;
  p.B = B; p.H = H; p.Hkv = Hkv; p.N = N; p.D = D; p.E = E; p.scale = 0.7;
  p.decay = lam.data();
  p.q = bnhd(q.data(), H, D);
  p.k = bnhd(k.data(), Hkv, D);
  p.v = bnhd(v.data(), Hkv, E);
  p.o = bnhd(o.data(), H, E);
  lasp::cpu::fwd(p);

  AttnParams pd = params_for(pr);
  std::vector<double> od(B * H * N * E);
  pd.o = dense(od.data(), H, N, E);
  lasp::cpu::fwd(pd);
  std::vector<double> o_as_bhnd(od.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < N; ++t)
        for (int64_t j = 0; j < E; ++j) o_as_bhnd[((b * H + h) * N + t) * E + j] = o[((b * N + t) * H + h) * E + j];
  EXPECT_LT(rel_err(o_as_bhnd, od), 1e-5);
}

}  // namespace
