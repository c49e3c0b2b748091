// GoogleTest of the peer-memory ring hop (kernels/peer_hop.h) on one device: the buffers of W "ranks"
// live on the same GPU, so one process drives the whole chain, and the sanitizers can run it. Each call
// sends fresh random states; every rank's outputs are compared with the chain computed in float64 here:
//   forward (dir 0): out_r = gamma_r * out_{r-1} + add_r, out_0 = add_0 (sent as is), gamma_r per head from
//                    the decay, or given per (b, h) block of the state (per-token gates)
//   backward (dir 1): the same from rank W-1 down to rank 0.
#include <gtest/gtest.h>

#if defined(LASP_WITH_CUDA)
#include <cuda_runtime_api.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "peer_hop.h"

namespace {

#define CKP(expr)                                                                \
  do {                                                                           \
    cudaError_t e__ = (expr);                                                    \
    ASSERT_EQ(e__, cudaSuccess) << #expr << ": " << cudaGetErrorString(e__);     \
  } while (0)

bool have_device() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

struct Chain {
  int W;
  int64_t H, per_head, numel;
  std::vector<char*> bases;
  std::vector<float*> add, out, in_copy;
  float* decay = nullptr;
  std::vector<float*> factors;  // per rank: (numel / per_head) gamma per (b, h) block
  int* timed_out = nullptr;
  ~Chain() {
    for (char* b : bases) cudaFree(b);
    for (auto* v : {&add, &out, &in_copy})
      for (float* f : *v) cudaFree(f);
    cudaFree(decay);
    for (float* f : factors) cudaFree(f);
    cudaFree(timed_out);
  }
};

// Runs `calls` hops in direction dir over W ranks; launch_reverse: the downstream ranks are launched
// first, each on its own stream, so their kernels wait for their upstream in the flags.
// per_bh: each rank's factors per (b, h) block (here the H blocks of the state; one of them exactly 0, a
// reset) instead of the decay.
void run_chain(int W, int64_t H, int64_t D, int64_t E, int dir, int calls, bool launch_reverse, bool with_decay,
               bool per_bh = false) {
  const uint64_t seed = std::chrono::steady_clock::now().time_since_epoch().count();
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uni(0.f, 0.3f);
  SCOPED_TRACE("seed " + std::to_string(seed) + " W " + std::to_string(W) + " dir " + std::to_string(dir));
  Chain c;
  c.W = W;
  c.H = H;
  c.per_head = D * E;
  c.numel = H * D * E;
  const size_t sbytes = c.numel * sizeof(float);
  c.bases.assign(W, nullptr);
  for (int r = 0; r < W; ++r) {
    CKP(cudaMalloc(reinterpret_cast<void**>(&c.bases[r]), lasp::cuda::peer_buffer_bytes(c.numel)));
    CKP(cudaMemset(c.bases[r], 0, lasp::cuda::peer_buffer_bytes(c.numel)));
    for (auto* v : {&c.add, &c.out, &c.in_copy}) {
      float* f = nullptr;
      CKP(cudaMalloc(reinterpret_cast<void**>(&f), sbytes));
      v->push_back(f);
    }
  }
  std::vector<float> rates(H);
  for (auto& x : rates) x = uni(rng);
  CKP(cudaMalloc(reinterpret_cast<void**>(&c.decay), H * sizeof(float)));
  CKP(cudaMemcpy(c.decay, rates.data(), H * sizeof(float), cudaMemcpyHostToDevice));
  CKP(cudaMalloc(reinterpret_cast<void**>(&c.timed_out), sizeof(int)));
  CKP(cudaMemset(c.timed_out, 0, sizeof(int)));
  std::vector<int64_t> n(W);
  for (int r = 0; r < W; ++r) n[r] = 1 + static_cast<int64_t>(rng() % 50);
  std::vector<std::vector<float>> fac(W, std::vector<float>(H));
  if (per_bh) {
    std::uniform_real_distribution<float> unit(0.05f, 1.f);
    for (int r = 0; r < W; ++r) {
      for (auto& x : fac[r]) x = unit(rng);
      fac[r][rng() % H] = 0.f;
      float* f = nullptr;
      CKP(cudaMalloc(reinterpret_cast<void**>(&f), H * sizeof(float)));
      CKP(cudaMemcpy(f, fac[r].data(), H * sizeof(float), cudaMemcpyHostToDevice));
      c.factors.push_back(f);
    }
  }

  std::vector<cudaStream_t> streams(W);
  for (auto& s : streams) CKP(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const float nan = std::nanf("");
  for (int call = 1; call <= calls; ++call) {
    std::vector<std::vector<float>> adds(W, std::vector<float>(c.numel));
    for (int r = 0; r < W; ++r) {
      for (auto& x : adds[r]) x = normal(rng);
      CKP(cudaMemcpy(c.add[r], adds[r].data(), sbytes, cudaMemcpyHostToDevice));
      std::vector<float> poison(c.numel, nan);
      CKP(cudaMemcpy(c.out[r], poison.data(), sbytes, cudaMemcpyHostToDevice));
      CKP(cudaMemcpy(c.in_copy[r], poison.data(), sbytes, cudaMemcpyHostToDevice));
    }
    for (int i = 0; i < W; ++i) {
      // chain order: dir 0 from rank 0, dir 1 from rank W-1; reversed: the last in the chain first
      const int pos = launch_reverse ? W - 1 - i : i;
      const int r = dir == 0 ? pos : W - 1 - pos;
      lasp::cuda::PeerHopParams p;
      lasp::cuda::peer_hop_addresses(p, c.bases.data(), c.numel, r, W, dir);
      p.numel = c.numel;
      p.H = H;
      p.per_head = c.per_head;
      p.decay = with_decay ? c.decay : nullptr;
      p.n = n[r];
      p.gamma = per_bh ? c.factors[r] : nullptr;
      p.add = c.add[r];
      p.out = c.out[r];
      p.in_copy = c.in_copy[r];
      p.seq = static_cast<uint32_t>(call);
      p.timeout_ns = 20ull * 1000 * 1000 * 1000;
      p.timed_out = c.timed_out;
      p.trap_on_timeout = false;
      CKP(lasp::cuda::peer_hop(p, launch_reverse ? streams[r] : streams[0]));
    }
    CKP(cudaDeviceSynchronize());
    int timed_out = 0;
    CKP(cudaMemcpy(&timed_out, c.timed_out, sizeof(int), cudaMemcpyDeviceToHost));
    ASSERT_EQ(timed_out, 0) << "a hop gave up waiting (call " << call << ")";

    // float64 chain
    std::vector<double> prev;
    for (int pos = 0; pos < W; ++pos) {
      const int r = dir == 0 ? pos : W - 1 - pos;
      std::vector<double> want(c.numel);
      for (int64_t i = 0; i < c.numel; ++i) {
        const int64_t h = (i / c.per_head) % H;
        double g = with_decay ? std::exp(-static_cast<double>(rates[h]) * static_cast<double>(n[r])) : 1.0;
        if (per_bh) g = fac[r][i / c.per_head];
        want[i] = pos == 0 ? adds[r][i] : g * prev[i] + adds[r][i];
      }
      if (pos > 0) {
        std::vector<float> got(c.numel), got_in(c.numel);
        CKP(cudaMemcpy(got.data(), c.out[r], sbytes, cudaMemcpyDeviceToHost));
        CKP(cudaMemcpy(got_in.data(), c.in_copy[r], sbytes, cudaMemcpyDeviceToHost));
        double err = 0, err_in = 0, norm = 0, norm_in = 0;
        for (int64_t i = 0; i < c.numel; ++i) {
          err += (got[i] - want[i]) * (got[i] - want[i]);
          norm += want[i] * want[i];
          err_in += (got_in[i] - prev[i]) * (got_in[i] - prev[i]);
          norm_in += prev[i] * prev[i];
        }
        // NaN (a slice never written) makes the errors NaN, and the comparisons below fail
        EXPECT_LT(std::sqrt(err / norm), 1e-6) << "out of rank " << r << ", call " << call;
        EXPECT_LT(std::sqrt(err_in / norm_in), 1e-6) << "received state of rank " << r << ", call " << call;
      }
      prev = want;
    }
  }
  for (auto& s : streams) CKP(cudaStreamDestroy(s));
}

TEST(PeerHop, ChainMatchesFloat64InLaunchOrder) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  for (int dir : {0, 1}) {
    run_chain(3, 4, 16, 8, dir, 4, /*launch_reverse=*/false, /*with_decay=*/true);
    run_chain(2, 3, 5, 7, dir, 3, false, false);  // odd sizes: the scalar path
  }
}

// The hop in two calls (the delta rule's ring, PeerMapRing): phase 1 receives only (out = the upstream's
// state), the host makes S_out = T_r S_in + L_r, phase 2 sends it, as the same call of the channel. Every
// rank in chain order, `calls` calls in a row (the flags' call counts), against the chain in float64.
void run_split_chain(int W, int64_t H, int64_t D, int64_t E, int dir, int calls) {
  std::mt19937_64 rng(12345 + 7 * W + dir);
  std::normal_distribution<double> normal;
  SCOPED_TRACE("split hop, W " + std::to_string(W) + " dir " + std::to_string(dir));
  const int64_t numel = H * D * E;
  const size_t sbytes = numel * sizeof(float);
  Chain c;
  c.W = W;
  c.H = H;
  c.per_head = D * E;
  c.numel = numel;
  c.bases.assign(W, nullptr);
  for (int r = 0; r < W; ++r) {
    CKP(cudaMalloc(reinterpret_cast<void**>(&c.bases[r]), lasp::cuda::peer_buffer_bytes(numel)));
    CKP(cudaMemset(c.bases[r], 0, lasp::cuda::peer_buffer_bytes(numel)));
    for (auto* v : {&c.add, &c.out, &c.in_copy}) {
      float* f = nullptr;
      CKP(cudaMalloc(reinterpret_cast<void**>(&f), sbytes));
      v->push_back(f);
    }
  }
  CKP(cudaMalloc(reinterpret_cast<void**>(&c.timed_out), sizeof(int)));
  CKP(cudaMemset(c.timed_out, 0, sizeof(int)));
  for (int call = 1; call <= calls; ++call) {
    std::vector<double> prev;  // S_out of the previous rank in the chain
    for (int pos = 0; pos < W; ++pos) {
      const int r = dir == 0 ? pos : W - 1 - pos;
      std::vector<double> T(H * D * D), L(numel);
      for (auto& x : T) x = normal(rng) / std::sqrt(static_cast<double>(D));
      for (auto& x : L) x = normal(rng);
      lasp::cuda::PeerHopParams p;
      lasp::cuda::peer_hop_addresses(p, c.bases.data(), numel, r, W, dir);
      const bool up = p.recv, down = p.send;
      p.numel = numel;
      p.H = H;
      p.per_head = c.per_head;
      p.seq = static_cast<uint32_t>(call);
      p.timeout_ns = 20ull * 1000 * 1000 * 1000;
      p.timed_out = c.timed_out;
      p.trap_on_timeout = false;
      // phase 1: receive only, add = 0
      std::vector<float> zeros(numel, 0.f), poison(numel, std::nanf(""));
      CKP(cudaMemcpy(c.add[r], zeros.data(), sbytes, cudaMemcpyHostToDevice));
      CKP(cudaMemcpy(c.out[r], poison.data(), sbytes, cudaMemcpyHostToDevice));
      p.add = c.add[r];
      p.out = c.out[r];
      p.send = false;
      CKP(lasp::cuda::peer_hop(p, 0));
      CKP(cudaDeviceSynchronize());
      std::vector<double> s_in(numel, 0.0);
      if (up) {
        std::vector<float> got(numel);
        CKP(cudaMemcpy(got.data(), c.out[r], sbytes, cudaMemcpyDeviceToHost));
        double err = 0, norm = 0;
        for (int64_t i = 0; i < numel; ++i) {
          s_in[i] = got[i];
          err += (got[i] - prev[i]) * (got[i] - prev[i]);
          norm += prev[i] * prev[i];
        }
        EXPECT_LT(std::sqrt(err / norm), 1e-6) << "received state of rank " << r << ", call " << call;
      }
      // the update the kernel does not make: S_out = T S_in + L per head
      std::vector<double> s_out(numel);
      std::vector<float> s_out_f(numel);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t e = 0; e < E; ++e) {
            double s = L[(h * D + d) * E + e];
            for (int64_t j = 0; j < D; ++j) s += T[(h * D + d) * D + j] * s_in[(h * D + j) * E + e];
            s_out[(h * D + d) * E + e] = s;
            s_out_f[(h * D + d) * E + e] = static_cast<float>(s);
          }
      // phase 2: send only, the same call
      CKP(cudaMemcpy(c.add[r], s_out_f.data(), sbytes, cudaMemcpyHostToDevice));
      p.recv = false;
      p.send = down;
      p.out = nullptr;
      CKP(lasp::cuda::peer_hop(p, 0));
      CKP(cudaDeviceSynchronize());
      prev.assign(s_out_f.begin(), s_out_f.end());
    }
    int timed_out = 0;
    CKP(cudaMemcpy(&timed_out, c.timed_out, sizeof(int), cudaMemcpyDeviceToHost));
    ASSERT_EQ(timed_out, 0) << "a hop gave up waiting (call " << call << ")";
  }
}

TEST(PeerHop, TwoCallHopOfMatrixMaps) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  for (int dir : {0, 1}) {
    run_split_chain(3, 2, 8, 4, dir, 3);
    run_split_chain(4, 3, 5, 7, dir, 2);  // odd sizes: the scalar path
  }
}

TEST(PeerHop, PerBlockFactorsOfGates) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  for (int dir : {0, 1}) {
    // the factors override the decay (given too, and ignored)
    run_chain(3, 6, 16, 8, dir, 3, /*launch_reverse=*/false, /*with_decay=*/true, /*per_bh=*/true);
    run_chain(4, 5, 3, 7, dir, 2, /*launch_reverse=*/true, /*with_decay=*/false, /*per_bh=*/true);  // scalar path
  }
}

TEST(PeerHop, DownstreamRanksWaitForTheirUpstream) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  for (int dir : {0, 1}) run_chain(4, 16, 128, 128, dir, 5, /*launch_reverse=*/true, /*with_decay=*/true);
}

}  // namespace

#else  // !LASP_WITH_CUDA

TEST(PeerHop, Skipped) { GTEST_SKIP() << "no CUDA device: lasp was built without CUDA (LASP_WITH_CUDA unset)"; }

#endif
