// The gated delta rule's two chains in 16 bits (delta_chain16.h): one block of 8 warps per (b, h, 64 columns of
// E), the state or its gradient (D x 64, fp32) in the warps' mma.sync accumulators, 16-bit tiles in shared memory
// with rows of D + 8 and 72 entries (odd multiples of 16 bytes, so ldmatrix is conflict-free), filled by cp.async
// with zeros past N. The log gates' sums are formed as the WY kernel forms them (each entry's gates added in
// order, so a -inf gate gives exact zeros). The 16-bit operands are rounded as fla's chunk kernels round theirs;
// accumulation in fp32.
//
// Forward (states16_kernel), per chunk: K, W_k (C x D), W_v (C x 64); suf and pre[C-1]; S to 16 bits (shared
// memory, and out as Sb[c]); U = W_v - W_k S (out), diag(suf) U to 16 bits; S <- pre[C-1] S + K^T (diag(suf) U)
// (K^T by ldmatrix.trans). Three barriers per chunk, about 72 KiB of shared memory at D = 128 (two blocks per SM,
// so one block's loads run under the other's products).
//
// Reverse (rev16_kernel), per chunk:
//   L. q, k, W_k (C x D) and dO (C x 64); the log gates;
//   1. Gam (fp32, its lower triangle; its last row is suf) and pre; G rounded to 16 bits into shared memory and out
//      as dSe[c];
//   2. P^T = scale (K Q^T) * Gam^T on and above the diagonal (16-bit, shared);
//   3. Q's rows scaled by scale pre in place (16-bit); dU = diag(suf) K G + P^T dO (m16n8k16), out and kept in
//      shared memory (16-bit);
//   4. G <- pre[C-1] G + (diag(scale pre) Q)^T dO - W_k^T dU, the transposed operands by ldmatrix.trans.
// Five barriers per chunk; about 105 KiB of shared memory at D = 128 and at most 128 registers, so two blocks share
// an SM and the 2 B H blocks of a (B, H, 128-column) problem run in one wave on 132 SMs (one block per SM took two),
// one block's loads under the other's products.
#include "delta_chain16.h"
#include "delta_prep.h"  // gate_parts
#include "mma.cuh"

namespace lasp {
namespace cuda {
namespace {

constexpr int kC = 64, kEt = 64, kLdE = kEt + 8, kThreads = 256;

// Warp w's part of the block's D x 64 state (or state gradient) in its accumulators X[NT][4]: rows m0 .. m0 + 15
// (m16n8 fragments: rows gq and gq + 8), NT n-tiles of 8 columns from n0.
template <int D>
struct StateTile {
  static constexpr int WPM = D / 16, NS = 8 / WPM, NT = 8 / NS;
  int m0, n0, gq, cq;
  __device__ explicit StateTile(int t)
      : m0(((t >> 5) % WPM) * 16), n0(((t >> 5) / WPM) * (kEt / NS)), gq((t & 31) >> 2), cq(t & 3) {}
  __device__ int row(int e) const { return m0 + gq + (e >> 1) * 8; }
  __device__ int col(int nt, int e) const { return n0 + 8 * nt + 2 * cq + (e & 1); }
  // X from src (rows of ld floats), zeros where src is null; X to dst.
  __device__ void load(float (&X)[NT][4], const float* src, int64_t ld) const {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) X[nt][e] = src ? src[row(e) * ld + col(nt, e)] : 0.f;
  }
  __device__ void store(const float (&X)[NT][4], float* dst, int64_t ld) const {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[row(e) * ld + col(nt, e)] = X[nt][e];
  }
  // X rounded to 16 bits into shared memory (rows of kLdE) and global memory (rows of ld).
  template <typename T16>
  __device__ void put16(const float (&X)[NT][4], T16* s, T16* g, int64_t ld) const {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int r = row(2 * hh), c = col(nt, 0);
        const uint32_t v = mma::pack2<T16>(X[nt][2 * hh], X[nt][2 * hh + 1]);
        *reinterpret_cast<uint32_t*>(s + r * kLdE + c) = v;
        *reinterpret_cast<uint32_t*>(g + r * ld + c) = v;
      }
  }
  __device__ void scale(float (&X)[NT][4], float f) const {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) X[nt][e] *= f;
  }
  // X += (+/-) A^T B over the chunk's kC rows: A (kC x D) in shared memory with rows of lda, read transposed by
  // ldmatrix.trans (negated by the fragments' sign bits where neg), B (kC x 64) with rows of kLdE.
  template <typename T16>
  __device__ void mac_t(float (&X)[NT][4], const T16* sA, int lda, const T16* sB, bool neg) const {
    for (int k0 = 0; k0 < kC; k0 += 16) {
      uint32_t af[4], bf[4];
      mma::load_a_t(af, sA, lda, m0, k0);
      if (neg)
#pragma unroll
        for (int i = 0; i < 4; ++i) af[i] ^= 0x80008000u;
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        mma::load_b_kn(bf, sB, kLdE, k0, n0 + 16 * np);
        mma::mma16816<T16>(X[2 * np], af, bf[0], bf[1]);
        mma::mma16816<T16>(X[2 * np + 1], af, bf[2], bf[3]);
      }
    }
  }
};

// Gam's lower triangle (Gam[i][j], j <= i), packed by rows: kTri fp32 entries, row i from tri(i, 0).
constexpr int kTri = kC * (kC + 1) / 2;
__device__ __forceinline__ int tri(int i, int j) { return i * (i + 1) / 2 + j; }

template <int D>
struct RevLayout {
  static constexpr int kLdD = D + 8;
  // one stage of q (scaled in place by scale pre in step 3), k, W_k, dO; byte offsets
  static constexpr size_t q = 0;
  static constexpr size_t k = q + (size_t)kC * kLdD * 2;
  static constexpr size_t w = k + (size_t)kC * kLdD * 2;
  static constexpr size_t dO = w + (size_t)kC * kLdD * 2;
  static constexpr size_t P = dO + (size_t)kC * kLdE * 2;
  static constexpr size_t G = P + (size_t)kC * kLdE * 2;
  static constexpr size_t dU = G + (size_t)D * kLdE * 2;
  static constexpr size_t gam = dU + (size_t)kC * kLdE * 2;
  static constexpr size_t g = gam + (size_t)kTri * 4;
  static constexpr size_t pre = g + kC * 4;
  static constexpr size_t bytes = pre + kC * 4;
  // two blocks per SM (228 KiB of shared memory, 1 KiB of it reserved per block)
  static_assert(2 * (bytes + 1024) <= 228 * 1024, "two reverse-chain blocks fit an SM");
};

template <typename T16, int D>
__global__ void __launch_bounds__(kThreads, 2) rev16_kernel(Rev16Args a) {
  using L = RevLayout<D>;
  constexpr int LdD = L::kLdD;
  extern __shared__ __align__(16) unsigned char sm[];
  T16* sQ = reinterpret_cast<T16*>(sm + L::q);
  T16* sK = reinterpret_cast<T16*>(sm + L::k);
  T16* sW = reinterpret_cast<T16*>(sm + L::w);
  T16* sdO = reinterpret_cast<T16*>(sm + L::dO);
  T16* sP = reinterpret_cast<T16*>(sm + L::P);
  T16* sG = reinterpret_cast<T16*>(sm + L::G);
  T16* sdU = reinterpret_cast<T16*>(sm + L::dU);
  float* sgam = reinterpret_cast<float*>(sm + L::gam);
  float* sg = reinterpret_cast<float*>(sm + L::g);
  float* spre = reinterpret_cast<float*>(sm + L::pre);

  const int ets = a.E / kEt, e0 = blockIdx.x % ets * kEt;
  const int64_t bh = blockIdx.x / ets, b = bh / a.H, h = bh % a.H;
  const int t = threadIdx.x, w = t >> 5, gq = (t & 31) >> 2, cq = t & 3;
  const int64_t nc = (a.N + kC - 1) / kC;
  const T16* qh = static_cast<const T16*>(a.q) + b * a.qs[0] + (h / a.qgroup) * a.qs[1];
  const T16* kh = static_cast<const T16*>(a.k) + b * a.ks[0] + (h / a.kgroup) * a.ks[1];
  const T16* wh = static_cast<const T16*>(a.wk) + bh * a.N * D;
  const T16* dh = static_cast<const T16*>(a.dout) + b * a.ds[0] + h * a.ds[1] + e0;
  const float* gh = a.g + bh * a.N;
  T16* duh = static_cast<T16*>(a.du) + bh * a.N * a.E + e0;
  T16* dseh = static_cast<T16*>(a.dse) + bh * nc * D * a.E + e0;

  const StateTile<D> st(t);
  float G[StateTile<D>::NT][4];
  st.load(G, a.dS_end ? a.dS_end + bh * D * a.E + e0 : nullptr, a.E);

  for (int64_t c = nc - 1; c >= 0; --c) {
    const int64_t n0 = c * kC;
    const int rows = (int)(a.N - n0 < kC ? a.N - n0 : kC);
    // L.
    mma::cp_rows(sQ, LdD, qh + n0 * a.qs[2], a.qs[2], rows, kC, D, t, kThreads);
    mma::cp_rows(sK, LdD, kh + n0 * a.ks[2], a.ks[2], rows, kC, D, t, kThreads);
    mma::cp_rows(sW, LdD, wh + n0 * D, D, rows, kC, D, t, kThreads);
    mma::cp_rows(sdO, kLdE, dh + n0 * a.ds[2], a.ds[2], rows, kC, kEt, t, kThreads);
    mma::cp_async_commit();
    if (t < kC) sg[t] = t < rows ? gh[n0 + t] : 0.f;
    mma::cp_async_wait<0>();
    __syncthreads();
    // 1.
    gate_parts<float>(
        t, kThreads, kC, sg, true,
        [&](int i, int j, float x) {
          if (j <= i) sgam[tri(i, j)] = x;
        },
        [&](int i, float p) { spre[i] = p; });
    st.put16(G, sG, dseh + c * D * a.E, a.E);
    __syncthreads();
    const int m0 = (w % 4) * 16, h0 = (w / 4) * 32;  // steps 2 and 3: rows m0.., columns h0.. (4 n-tiles)
    {                                                // 2.
      float acc[4][4] = {};
      if (h0 + 31 >= m0) mma::mac<false, true>(acc, sK, LdD, sQ, LdD, m0, h0, 0, D);  // K Q^T, tiles not wholly below
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int j = m0 + gq + hh * 8;  // K's token (row of P^T)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int i = h0 + 8 * nt + 2 * cq;  // Q's token (column)
          const float x0 = i >= j ? a.scale * acc[nt][2 * hh] * sgam[tri(i, j)] : 0.f;
          const float x1 = i + 1 >= j ? a.scale * acc[nt][2 * hh + 1] * sgam[tri(i + 1, j)] : 0.f;
          *reinterpret_cast<uint32_t*>(sP + j * kLdE + i) = mma::pack2<T16>(x0, x1);
        }
      }
      __syncthreads();
    }
    {  // 3.
      // Q's rows times scale pre, in place (step 2 was its last other reader; step 4 reads it)
      for (int e = t; e < kC * D / 2; e += kThreads) {
        const int r = e / (D / 2), x = (e % (D / 2)) * 2;
        const float f = a.scale * spre[r];
        uint32_t* p = reinterpret_cast<uint32_t*>(sQ + r * LdD + x);
        const float2 u = mma::unpack2<T16>(*p);
        *p = mma::pack2<T16>(u.x * f, u.y * f);
      }
      float acc[4][4] = {};
      mma::mac<false, false>(acc, sK, LdD, sG, kLdE, m0, h0, 0, D);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] *= sgam[tri(kC - 1, m0 + gq + (e >> 1) * 8)];  // suf
      mma::mac<false, false>(acc, sP, kLdE, sdO, kLdE, m0, h0, m0, kC);
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
    // 4.
    st.scale(G, spre[kC - 1]);
    st.mac_t(G, sQ, LdD, sdO, false);
    st.mac_t(G, sW, LdD, sdU, true);
    __syncthreads();
  }
  st.store(G, a.dS0 + bh * D * a.E + e0, a.E);
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

  const int ets = a.E / kEt, e0 = blockIdx.x % ets * kEt;
  const int64_t bh = blockIdx.x / ets, b = bh / a.H, h = bh % a.H;
  const int t = threadIdx.x, w = t >> 5, gq = (t & 31) >> 2, cq = t & 3;
  const int64_t nc = (a.N + kC - 1) / kC;
  const T16* kh = static_cast<const T16*>(a.k) + b * a.ks[0] + (h / a.kgroup) * a.ks[1];
  const T16* wh = static_cast<const T16*>(a.wk) + bh * a.N * D;
  const T16* vh = static_cast<const T16*>(a.wv) + bh * a.N * a.E + e0;
  const float* gh = a.g + bh * a.N;
  T16* uh = static_cast<T16*>(a.u) + bh * a.N * a.E + e0;
  T16* sbh = static_cast<T16*>(a.sb) + bh * nc * D * a.E + e0;

  const StateTile<D> st(t);
  float S[StateTile<D>::NT][4];
  st.load(S, a.S0 ? a.S0 + bh * D * a.E + e0 : nullptr, a.E);

  for (int64_t c = 0; c < nc; ++c) {
    const int64_t n0 = c * kC;
    const int rows = (int)(a.N - n0 < kC ? a.N - n0 : kC);
    mma::cp_rows(sK, LdD, kh + n0 * a.ks[2], a.ks[2], rows, kC, D, t, kThreads);
    mma::cp_rows(sW, LdD, wh + n0 * D, D, rows, kC, D, t, kThreads);
    mma::cp_rows(sV, kLdE, vh + n0 * a.E, a.E, rows, kC, kEt, t, kThreads);
    mma::cp_async_commit();
    if (t < kC) sg[t] = t < rows ? gh[n0 + t] : 0.f;
    mma::cp_async_wait<0>();
    __syncthreads();
    // suf[j] = exp(g[j+1] + ... + g[C-1]) and pre[C-1], the gates added in order; S to 16 bits, out as Sb[c]
    if (t <= kC) {
      float x = 0.f;
      for (int u = t < kC ? t + 1 : 0; u < kC; ++u) x += sg[u];
      (t < kC ? ssuf[t] : spl[0]) = expf(x);
    }
    st.put16(S, sS, sbh + c * D * a.E, a.E);
    __syncthreads();
    {  // U = W_v - W_k S (rows m0.., columns h0.. per warp), out; diag(suf) U to 16 bits
      const int m0 = (w % 4) * 16, h0 = (w / 4) * 32;
      float acc[4][4] = {};
      mma::mac<false, false>(acc, sW, LdD, sS, kLdE, m0, h0, 0, D);
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
    // S <- pre[C-1] S + K^T (diag(suf) U)
    st.scale(S, spl[0]);
    st.mac_t(S, sK, LdD, sUs, false);
    __syncthreads();
  }
  st.store(S, a.fin + bh * D * a.E + e0, a.E);
}

// Launches kernel over (b, h, 64 columns of E) with smem bytes of dynamic shared memory.
template <typename A>
cudaError_t launch_chain(void (*kernel)(A), size_t smem, const A& a, cudaStream_t st) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  kernel<<<(unsigned)(a.B * a.H * (a.E / kEt)), kThreads, smem, st>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool delta_states16_takes(const States16Args& a) {
  return (a.D == 64 || a.D == 128) && a.E >= kEt && a.E % kEt == 0 && a.B >= 0 && a.H >= 1 && a.N >= 0 &&
         a.kgroup >= 1 && mma::rows_on_16_bytes(a.k, a.ks) && reinterpret_cast<uintptr_t>(a.wk) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(a.wv) % 16 == 0 && reinterpret_cast<uintptr_t>(a.u) % 4 == 0 &&
         reinterpret_cast<uintptr_t>(a.sb) % 4 == 0 && a.fin != nullptr && a.B * a.H * (a.E / kEt) <= INT32_MAX;
}

cudaError_t delta_states16(const States16Args& a, cudaStream_t st) {
  if (!delta_states16_takes(a)) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  if (a.D == 128)
    return a.bf16 ? launch_chain(states16_kernel<__nv_bfloat16, 128>, StatesLayout<128>::bytes, a, st)
                  : launch_chain(states16_kernel<__half, 128>, StatesLayout<128>::bytes, a, st);
  return a.bf16 ? launch_chain(states16_kernel<__nv_bfloat16, 64>, StatesLayout<64>::bytes, a, st)
                : launch_chain(states16_kernel<__half, 64>, StatesLayout<64>::bytes, a, st);
}

bool delta_rev16_takes(const Rev16Args& a) {
  return (a.D == 64 || a.D == 128) && a.E >= kEt && a.E % kEt == 0 && a.B >= 0 && a.H >= 1 && a.N >= 0 &&
         a.qgroup >= 1 && a.kgroup >= 1 && mma::rows_on_16_bytes(a.q, a.qs) && mma::rows_on_16_bytes(a.k, a.ks) &&
         mma::rows_on_16_bytes(a.dout, a.ds) && reinterpret_cast<uintptr_t>(a.wk) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(a.du) % 4 == 0 && reinterpret_cast<uintptr_t>(a.dse) % 4 == 0 &&
         a.dS0 != nullptr && a.B * a.H * (a.E / kEt) <= INT32_MAX;
}

cudaError_t delta_rev16(const Rev16Args& a, cudaStream_t st) {
  if (!delta_rev16_takes(a)) return cudaErrorInvalidValue;
  if (a.B == 0) return cudaSuccess;
  if (a.D == 128)
    return a.bf16 ? launch_chain(rev16_kernel<__nv_bfloat16, 128>, RevLayout<128>::bytes, a, st)
                  : launch_chain(rev16_kernel<__half, 128>, RevLayout<128>::bytes, a, st);
  return a.bf16 ? launch_chain(rev16_kernel<__nv_bfloat16, 64>, RevLayout<64>::bytes, a, st)
                : launch_chain(rev16_kernel<__half, 64>, RevLayout<64>::bytes, a, st);
}

}  // namespace cuda
}  // namespace lasp
