// The gated delta rule's two chains in 16 bits (delta_chain16.h): one block of 8 warps per (b, h, 64 columns of
// E), the state or its gradient (D x 64, fp32) in the warps' mma.sync accumulators, 16-bit tiles in shared memory
// with rows of D + 8 and 72 entries (odd multiples of 16 bytes, so ldmatrix is conflict-free), filled by cp.async
// with zeros past N. The log gates' sums are formed as the WY kernel forms them (each entry's gates added in
// order, so a -inf gate gives exact zeros). The 16-bit operands are rounded as fla's chunk kernels round theirs;
// accumulation in fp32.
//
// Forward (states16_kernel), per chunk: K, W_k (C x D), W_v (C x 64); suf and pre[C-1]; S to 16 bits (shared
// memory, and out as Sb[c]); U = W_v - W_k S (out), diag(suf) U to 16 bits; S <- pre[C-1] S + K^T (diag(suf) U)
// (K^T by ldmatrix.trans). Three barriers per chunk, about 72 KiB of shared memory at D = 128.
//
// Reverse (rev16_kernel), per chunk:
//   L. q, k, W_k (C x D) and dO (C x 64); the log gates;
//   1. Gam (fp32; its last row is suf) and pre; G rounded to 16 bits into shared memory and out as dSe[c];
//   2. P^T = scale (K Q^T) * Gam^T on and above the diagonal (16-bit, shared), diag(scale pre) dO (16-bit);
//   3. dU = diag(suf) K G + P^T dO (m16n8k16), out and kept in shared memory (16-bit);
//   4. G <- pre[C-1] G + Q^T (diag(scale pre) dO) - W_k^T dU, the transposed operands by ldmatrix.trans.
// Five barriers per chunk; about 122 KiB of shared memory at D = 128 (one block per SM).
#include "delta_chain16.h"
#include "mma.cuh"

namespace lasp {
namespace cuda {
namespace {

constexpr int kC = 64, kEt = 64, kLdE = kEt + 8, kThreads = 256, kLdGam = kC + 1;

template <int D>
struct RevLayout {
  static constexpr int kLdD = D + 8;
  static constexpr size_t q = 0;  // byte offsets
  static constexpr size_t k = q + (size_t)kC * kLdD * 2;
  static constexpr size_t w = k + (size_t)kC * kLdD * 2;
  static constexpr size_t dO = w + (size_t)kC * kLdD * 2;
  static constexpr size_t dOp = dO + (size_t)kC * kLdE * 2;
  static constexpr size_t P = dOp + (size_t)kC * kLdE * 2;
  static constexpr size_t G = P + (size_t)kC * kLdE * 2;
  static constexpr size_t dU = G + (size_t)D * kLdE * 2;
  static constexpr size_t gam = dU + (size_t)kC * kLdE * 2;
  static constexpr size_t g = gam + (size_t)kC * kLdGam * 4;
  static constexpr size_t pre = g + kC * 4;
  static constexpr size_t bytes = pre + kC * 4;
};

template <typename T16, int D>
__global__ void __launch_bounds__(kThreads, 1) rev16_kernel(Rev16Args a) {
  using L = RevLayout<D>;
  constexpr int LdD = L::kLdD;
  extern __shared__ __align__(16) unsigned char sm[];
  T16* sQ = reinterpret_cast<T16*>(sm + L::q);
  T16* sK = reinterpret_cast<T16*>(sm + L::k);
  T16* sW = reinterpret_cast<T16*>(sm + L::w);
  T16* sdO = reinterpret_cast<T16*>(sm + L::dO);
  T16* sdOp = reinterpret_cast<T16*>(sm + L::dOp);
  T16* sP = reinterpret_cast<T16*>(sm + L::P);
  T16* sG = reinterpret_cast<T16*>(sm + L::G);
  T16* sdU = reinterpret_cast<T16*>(sm + L::dU);
  float* sgam = reinterpret_cast<float*>(sm + L::gam);
  float* sg = reinterpret_cast<float*>(sm + L::g);
  float* spre = reinterpret_cast<float*>(sm + L::pre);

  const int ets = a.E / kEt, et = blockIdx.x % ets, e0 = et * kEt;
  const int64_t bh = blockIdx.x / ets, b = bh / a.H, h = bh % a.H;
  const int t = threadIdx.x, w = t >> 5, lane = t & 31, gq = lane >> 2, cq = lane & 3;
  const int64_t nc = (a.N + kC - 1) / kC;
  const T16* qh = static_cast<const T16*>(a.q) + b * a.qs[0] + (h / a.qgroup) * a.qs[1];
  const T16* kh = static_cast<const T16*>(a.k) + b * a.ks[0] + (h / a.kgroup) * a.ks[1];
  const T16* wh = static_cast<const T16*>(a.wk) + bh * a.N * D;
  const T16* dh = static_cast<const T16*>(a.dout) + b * a.ds[0] + h * a.ds[1] + e0;
  const float* gh = a.g + bh * a.N;
  T16* duh = static_cast<T16*>(a.du) + bh * a.N * a.E + e0;
  T16* dseh = static_cast<T16*>(a.dse) + bh * nc * D * a.E + e0;

  // G's tiles: warp w holds rows gm0 .. gm0 + 15 and NTW n-tiles from column gn0 (of the block's 64)
  constexpr int WPM = D / 16, NS = 8 / WPM, NTW = 8 / NS;
  const int gm0 = (w % WPM) * 16, gn0 = (w / WPM) * (kEt / NS);
  float G[NTW][4];
#pragma unroll
  for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = gm0 + gq + (e >> 1) * 8, col = gn0 + 8 * nt + 2 * cq + (e & 1);
      G[nt][e] = a.dS_end ? a.dS_end[(bh * D + row) * a.E + e0 + col] : 0.f;
    }

  for (int64_t c = nc - 1; c >= 0; --c) {
    const int64_t n0 = c * kC;
    const int rows = (int)(a.N - n0 < kC ? a.N - n0 : kC);
    {  // L.
      constexpr int VD = D / 8;
      for (int i = t; i < kC * VD; i += kThreads) {
        const int r = i / VD, x = (i % VD) * 8;
        const bool ok = r < rows;
        const int64_t n = ok ? n0 + r : 0;
        mma::cp_async16(sQ + r * LdD + x, qh + n * a.qs[2] + x, ok);
        mma::cp_async16(sK + r * LdD + x, kh + n * a.ks[2] + x, ok);
        mma::cp_async16(sW + r * LdD + x, wh + n * D + x, ok);
      }
      for (int i = t; i < kC * (kEt / 8); i += kThreads) {
        const int r = i / (kEt / 8), x = (i % (kEt / 8)) * 8;
        const bool ok = r < rows;
        mma::cp_async16(sdO + r * kLdE + x, dh + (ok ? n0 + r : 0) * a.ds[2] + x, ok);
      }
      mma::cp_async_commit();
      if (t < kC) sg[t] = t < rows ? gh[n0 + t] : 0.f;
      mma::cp_async_wait<0>();
      __syncthreads();
    }
    {  // 1. Gam down its columns in parts (column -1: pre), as the WY kernel forms them; G to 16 bits
      constexpr int parts = kThreads / (kC + 1), rpp = (kC + parts - 1) / parts;
      const int part = t / (kC + 1), j = t % (kC + 1) - 1, r0 = part * rpp, r1 = r0 + rpp < kC ? r0 + rpp : kC;
      if (part < parts) {
        float s = 0.f;
        for (int u = j + 1; u < r0; ++u) s += sg[u];
        for (int i = r0; i < r1; ++i) {
          if (j < 0) {
            s += sg[i];
            spre[i] = expf(s);
            continue;
          }
          float x = 0.f;
          if (i >= j) {
            if (i > j) s += sg[i];
            x = expf(s);
          }
          sgam[i * kLdGam + j] = x;
        }
      }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = gm0 + gq + hh * 8;
#pragma unroll
        for (int nt = 0; nt < NTW; ++nt) {
          const int col = gn0 + 8 * nt + 2 * cq;
          const uint32_t v = mma::pack2<T16>(G[nt][2 * hh], G[nt][2 * hh + 1]);
          *reinterpret_cast<uint32_t*>(sG + row * kLdE + col) = v;
          *reinterpret_cast<uint32_t*>(dseh + (c * D + row) * a.E + col) = v;
        }
      }
      __syncthreads();
    }
    const int mt = w % 4, m0 = mt * 16, h0 = (w / 4) * 32;  // steps 2 and 3: rows m0.., columns h0.. (4 n-tiles)
    {                                                       // 2.
      float acc[4][4] = {};
      if (h0 + 31 >= m0) {
        for (int k0 = 0; k0 < D; k0 += 16) {
          uint32_t af[4], bf[4];
          mma::load_a(af, sK, LdD, m0, k0);
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            mma::load_b_nk(bf, sQ, LdD, k0, h0 + 16 * np);
            mma::mma16816<T16>(acc[2 * np], af, bf[0], bf[1]);
            mma::mma16816<T16>(acc[2 * np + 1], af, bf[2], bf[3]);
          }
        }
      }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int j = m0 + gq + hh * 8;  // K's token (row of P^T)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int i = h0 + 8 * nt + 2 * cq;  // Q's token (column)
          const float x0 = i >= j ? a.scale * acc[nt][2 * hh] * sgam[i * kLdGam + j] : 0.f;
          const float x1 = i + 1 >= j ? a.scale * acc[nt][2 * hh + 1] * sgam[(i + 1) * kLdGam + j] : 0.f;
          *reinterpret_cast<uint32_t*>(sP + j * kLdE + i) = mma::pack2<T16>(x0, x1);
        }
      }
      for (int e = t; e < kC * kEt / 2; e += kThreads) {
        const int r = e / (kEt / 2), x = (e % (kEt / 2)) * 2;
        const float s = a.scale * spre[r];
        const float2 u = mma::unpack2<T16>(*reinterpret_cast<const uint32_t*>(sdO + r * kLdE + x));
        *reinterpret_cast<uint32_t*>(sdOp + r * kLdE + x) = mma::pack2<T16>(u.x * s, u.y * s);
      }
      __syncthreads();
    }
    {  // 3.
      float acc[4][4] = {};
      for (int k0 = 0; k0 < D; k0 += 16) {
        uint32_t af[4], bf[4];
        mma::load_a(af, sK, LdD, m0, k0);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          mma::load_b_kn(bf, sG, kLdE, k0, h0 + 16 * np);
          mma::mma16816<T16>(acc[2 * np], af, bf[0], bf[1]);
          mma::mma16816<T16>(acc[2 * np + 1], af, bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] *= sgam[(kC - 1) * kLdGam + m0 + gq + (e >> 1) * 8];  // suf
      for (int k0 = m0; k0 < kC; k0 += 16) {
        uint32_t af[4], bf[4];
        mma::load_a(af, sP, kLdE, m0, k0);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          mma::load_b_kn(bf, sdO, kLdE, k0, h0 + 16 * np);
          mma::mma16816<T16>(acc[2 * np], af, bf[0], bf[1]);
          mma::mma16816<T16>(acc[2 * np + 1], af, bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = m0 + gq + hh * 8;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int col = h0 + 8 * nt + 2 * cq;
          const uint32_t v = mma::pack2<T16>(acc[nt][2 * hh], acc[nt][2 * hh + 1]);
          *reinterpret_cast<uint32_t*>(sdU + row * kLdE + col) = v;
          if (row < rows) *reinterpret_cast<uint32_t*>(duh + (n0 + row) * a.E + col) = v;
        }
      }
      __syncthreads();
    }
    {  // 4.
      const float pl = spre[kC - 1];
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) G[nt][e] *= pl;
      for (int k0 = 0; k0 < kC; k0 += 16) {
        uint32_t af[4], bf[4];
        mma::load_a_t(af, sQ, LdD, gm0, k0);
#pragma unroll
        for (int np = 0; np < NTW / 2; ++np) {
          mma::load_b_kn(bf, sdOp, kLdE, k0, gn0 + 16 * np);
          mma::mma16816<T16>(G[2 * np], af, bf[0], bf[1]);
          mma::mma16816<T16>(G[2 * np + 1], af, bf[2], bf[3]);
        }
        mma::load_a_t(af, sW, LdD, gm0, k0);
#pragma unroll
        for (int i = 0; i < 4; ++i) af[i] ^= 0x80008000u;  // -W_k^T: both 16-bit halves' signs
#pragma unroll
        for (int np = 0; np < NTW / 2; ++np) {
          mma::load_b_kn(bf, sdU, kLdE, k0, gn0 + 16 * np);
          mma::mma16816<T16>(G[2 * np], af, bf[0], bf[1]);
          mma::mma16816<T16>(G[2 * np + 1], af, bf[2], bf[3]);
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = gm0 + gq + (e >> 1) * 8, col = gn0 + 8 * nt + 2 * cq + (e & 1);
      a.dS0[(bh * D + row) * a.E + e0 + col] = G[nt][e];
    }
}

template <int D>
struct StatesLayout {
  static constexpr int kLdD = D + 8;
  static constexpr size_t k = 0;  // byte offsets
  static constexpr size_t w = k + (size_t)kC * kLdD * 2;
  static constexpr size_t v = w + (size_t)kC * kLdD * 2;
  static constexpr size_t us = v + (size_t)kC * kLdE * 2;
  static constexpr size_t S = us + (size_t)kC * kLdE * 2;
  static constexpr size_t g = S + (size_t)D * kLdE * 2;
  static constexpr size_t suf = g + kC * 4;
  static constexpr size_t pl = suf + kC * 4;
  static constexpr size_t bytes = pl + 16;
};

template <typename T16, int D>
__global__ void __launch_bounds__(kThreads, 1) states16_kernel(States16Args a) {
  using L = StatesLayout<D>;
  constexpr int LdD = L::kLdD;
  extern __shared__ __align__(16) unsigned char sm[];
  T16* sK = reinterpret_cast<T16*>(sm + L::k);
  T16* sW = reinterpret_cast<T16*>(sm + L::w);
  T16* sV = reinterpret_cast<T16*>(sm + L::v);
  T16* sUs = reinterpret_cast<T16*>(sm + L::us);
  T16* sS = reinterpret_cast<T16*>(sm + L::S);
  float* sg = reinterpret_cast<float*>(sm + L::g);
  float* ssuf = reinterpret_cast<float*>(sm + L::suf);
  float* spl = reinterpret_cast<float*>(sm + L::pl);

  const int ets = a.E / kEt, et = blockIdx.x % ets, e0 = et * kEt;
  const int64_t bh = blockIdx.x / ets, b = bh / a.H, h = bh % a.H;
  const int t = threadIdx.x, w = t >> 5, lane = t & 31, gq = lane >> 2, cq = lane & 3;
  const int64_t nc = (a.N + kC - 1) / kC;
  const T16* kh = static_cast<const T16*>(a.k) + b * a.ks[0] + (h / a.kgroup) * a.ks[1];
  const T16* wh = static_cast<const T16*>(a.wk) + bh * a.N * D;
  const T16* vh = static_cast<const T16*>(a.wv) + bh * a.N * a.E + e0;
  const float* gh = a.g + bh * a.N;
  T16* uh = static_cast<T16*>(a.u) + bh * a.N * a.E + e0;
  T16* sbh = static_cast<T16*>(a.sb) + bh * nc * D * a.E + e0;

  constexpr int WPM = D / 16, NS = 8 / WPM, NTW = 8 / NS;  // S's tiles, as G's in rev16_kernel
  const int gm0 = (w % WPM) * 16, gn0 = (w / WPM) * (kEt / NS);
  float S[NTW][4];
#pragma unroll
  for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = gm0 + gq + (e >> 1) * 8, col = gn0 + 8 * nt + 2 * cq + (e & 1);
      S[nt][e] = a.S0 ? a.S0[(bh * D + row) * a.E + e0 + col] : 0.f;
    }

  for (int64_t c = 0; c < nc; ++c) {
    const int64_t n0 = c * kC;
    const int rows = (int)(a.N - n0 < kC ? a.N - n0 : kC);
    {  // loads
      constexpr int VD = D / 8;
      for (int i = t; i < kC * VD; i += kThreads) {
        const int r = i / VD, x = (i % VD) * 8;
        const bool ok = r < rows;
        const int64_t n = ok ? n0 + r : 0;
        mma::cp_async16(sK + r * LdD + x, kh + n * a.ks[2] + x, ok);
        mma::cp_async16(sW + r * LdD + x, wh + n * D + x, ok);
      }
      for (int i = t; i < kC * (kEt / 8); i += kThreads) {
        const int r = i / (kEt / 8), x = (i % (kEt / 8)) * 8;
        const bool ok = r < rows;
        mma::cp_async16(sV + r * kLdE + x, vh + (ok ? n0 + r : 0) * a.E + x, ok);
      }
      mma::cp_async_commit();
      if (t < kC) sg[t] = t < rows ? gh[n0 + t] : 0.f;
      mma::cp_async_wait<0>();
      __syncthreads();
    }
    // suf[j] = exp(g[j+1] + ... + g[C-1]) and pre[C-1], the gates added in order; S to 16 bits, out as Sb[c]
    if (t <= kC) {
      float s = 0.f;
      for (int u = t < kC ? t + 1 : 0; u < kC; ++u) s += sg[u];
      if (t < kC) {
        ssuf[t] = expf(s);
      } else {
        spl[0] = expf(s);
      }
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int row = gm0 + gq + hh * 8;
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt) {
        const int col = gn0 + 8 * nt + 2 * cq;
        const uint32_t v = mma::pack2<T16>(S[nt][2 * hh], S[nt][2 * hh + 1]);
        *reinterpret_cast<uint32_t*>(sS + row * kLdE + col) = v;
        *reinterpret_cast<uint32_t*>(sbh + (c * D + row) * a.E + col) = v;
      }
    }
    __syncthreads();
    {  // U = W_v - W_k S: rows m0.., columns h0.. (4 n-tiles) per warp
      const int m0 = (w % 4) * 16, h0 = (w / 4) * 32;
      float acc[4][4] = {};
      for (int k0 = 0; k0 < D; k0 += 16) {
        uint32_t af[4], bf[4];
        mma::load_a(af, sW, LdD, m0, k0);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          mma::load_b_kn(bf, sS, kLdE, k0, h0 + 16 * np);
          mma::mma16816<T16>(acc[2 * np], af, bf[0], bf[1]);
          mma::mma16816<T16>(acc[2 * np + 1], af, bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = m0 + gq + hh * 8;
        const float sf = ssuf[row];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int col = h0 + 8 * nt + 2 * cq;
          const float2 wv = mma::unpack2<T16>(*reinterpret_cast<const uint32_t*>(sV + row * kLdE + col));
          const float u0 = wv.x - acc[nt][2 * hh], u1 = wv.y - acc[nt][2 * hh + 1];
          if (row < rows) *reinterpret_cast<uint32_t*>(uh + (n0 + row) * a.E + col) = mma::pack2<T16>(u0, u1);
          *reinterpret_cast<uint32_t*>(sUs + row * kLdE + col) = mma::pack2<T16>(sf * u0, sf * u1);
        }
      }
      __syncthreads();
    }
    {  // S <- pre[C-1] S + K^T (diag(suf) U)
      const float pl = spl[0];
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) S[nt][e] *= pl;
      for (int k0 = 0; k0 < kC; k0 += 16) {
        uint32_t af[4], bf[4];
        mma::load_a_t(af, sK, LdD, gm0, k0);
#pragma unroll
        for (int np = 0; np < NTW / 2; ++np) {
          mma::load_b_kn(bf, sUs, kLdE, k0, gn0 + 16 * np);
          mma::mma16816<T16>(S[2 * np], af, bf[0], bf[1]);
          mma::mma16816<T16>(S[2 * np + 1], af, bf[2], bf[3]);
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = gm0 + gq + (e >> 1) * 8, col = gn0 + 8 * nt + 2 * cq + (e & 1);
      a.fin[(bh * D + row) * a.E + e0 + col] = S[nt][e];
    }
}

template <typename T16, int D>
cudaError_t launch_states16(const States16Args& a, cudaStream_t st) {
  const size_t smem = StatesLayout<D>::bytes;
  const cudaError_t e =
      cudaFuncSetAttribute(states16_kernel<T16, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  const int64_t blocks = a.B * a.H * (a.E / kEt);
  states16_kernel<T16, D><<<(unsigned)blocks, kThreads, smem, st>>>(a);
  return cudaGetLastError();
}

template <typename T16, int D>
cudaError_t launch_rev16(const Rev16Args& a, cudaStream_t st) {
  const size_t smem = RevLayout<D>::bytes;
  const cudaError_t e =
      cudaFuncSetAttribute(rev16_kernel<T16, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  const int64_t blocks = a.B * a.H * (a.E / kEt);
  rev16_kernel<T16, D><<<(unsigned)blocks, kThreads, smem, st>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool delta_states16_takes(const States16Args& a) {
  const bool k16 =
      reinterpret_cast<uintptr_t>(a.k) % 16 == 0 && a.ks[0] % 8 == 0 && a.ks[1] % 8 == 0 && a.ks[2] % 8 == 0;
  return (a.D == 64 || a.D == 128) && a.E >= kEt && a.E % kEt == 0 && a.B >= 0 && a.H >= 1 && a.N >= 0 &&
         a.kgroup >= 1 && k16 && reinterpret_cast<uintptr_t>(a.wk) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(a.wv) % 16 == 0 && reinterpret_cast<uintptr_t>(a.u) % 4 == 0 &&
         reinterpret_cast<uintptr_t>(a.sb) % 4 == 0 && a.fin != nullptr && a.B * a.H * (a.E / kEt) <= INT32_MAX;
}

cudaError_t delta_states16(const States16Args& a, cudaStream_t st) {
  if (!delta_states16_takes(a)) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  if (a.D == 128) return a.bf16 ? launch_states16<__nv_bfloat16, 128>(a, st) : launch_states16<__half, 128>(a, st);
  return a.bf16 ? launch_states16<__nv_bfloat16, 64>(a, st) : launch_states16<__half, 64>(a, st);
}

bool delta_rev16_takes(const Rev16Args& a) {
  auto rows16 = [](const void* p, const int64_t* s) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0;
  };
  return (a.D == 64 || a.D == 128) && a.E >= kEt && a.E % kEt == 0 && a.B >= 0 && a.H >= 1 && a.N >= 0 &&
         a.qgroup >= 1 && a.kgroup >= 1 && rows16(a.q, a.qs) && rows16(a.k, a.ks) && rows16(a.dout, a.ds) &&
         reinterpret_cast<uintptr_t>(a.wk) % 16 == 0 && reinterpret_cast<uintptr_t>(a.du) % 4 == 0 &&
         reinterpret_cast<uintptr_t>(a.dse) % 4 == 0 && a.dS0 != nullptr && a.B * a.H * (a.E / kEt) <= INT32_MAX;
}

cudaError_t delta_rev16(const Rev16Args& a, cudaStream_t st) {
  if (!delta_rev16_takes(a)) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  if (a.D == 128) return a.bf16 ? launch_rev16<__nv_bfloat16, 128>(a, st) : launch_rev16<__half, 128>(a, st);
  return a.bf16 ? launch_rev16<__nv_bfloat16, 64>(a, st) : launch_rev16<__half, 64>(a, st);
}

}  // namespace cuda
}  // namespace lasp
