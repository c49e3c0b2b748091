// The gated delta rule's per-chunk gradients in 16 bits (delta_grad16.h): one block of 8 warps per chunk, every
// operand of the chunk resident in shared memory as 16-bit tiles (rows of D + 8, E + 8 or C + 8 entries: odd
// multiples of 16 bytes, so ldmatrix is conflict-free), all of E at once, so the products summed over the value
// columns need no second pass. Products on mma.sync m16n8k16 with fp32 accumulation; the operands formed inside the
// kernel (Minv, dP, dWk, dRv, dRk, X, dkk) rounded to 16 bits, as fla's backward rounds its own.
//
//   L. cp.async in three groups: K (and Minv where given); Q, dO, U; Sb, dSe, dU, V; the gates and beta.
//   1. Gam (fp32; its last row is suf) and pre, each entry's gates added in order (gate_parts, as the WY kernel).
//   2. A = diag(beta) (Gam * K K^T), strictly lower (fp32; wy_a16).   3. Minv = m^-1 (invert_unit_lower64, fp32).
//   4. Minv to 16 bits. (2 to 4 only where Minv is not given: the forward's, in 16 bits, is the same.)
//   5. C x C tiles: dP = scale (dO U^T) * Gam (16 bits) and XG's first term dP * (Q K^T) (kept in registers).
//   6. C x D tiles: dO Sb^T -> rowsum(Q * dO Sb^T), dq = scale diag(pre) dO Sb^T + dP K (out); dU Sb^T (kept);
//      sum(dSe * Sb).
//   7. dWk = -dU Sb^T to 16 bits (over Sb).
//   8. dRk = Minv^T dWk (kept: dk's accumulator) -> rowsum(dRk * K); C x E tiles: dRv = Minv^T dU -> rowsum(dRv *
//      V), dv = diag(beta) dRv (out), dRv to 16 bits (over dO).
//   9. dRk to 16 bits (over dWk).
//  10. C x C tiles: X = (dRv V^T) diag(beta) + (dRk K^T) diag(beta pre) to 16 bits (over dU); K K^T (kept).
//  11. dA = -(X Minv^T) strictly lower -> rowsum(dA * Gam * K K^T); XG += diag(beta) dA * Gam * K K^T (into Gam's
//      tile, each entry by the thread that read it); dkk = diag(beta) dA * Gam to 16 bits (over V).
//  12. C x D tiles: dk = diag(beta pre) dRk + diag(suf) U dSe^T (-> rowsum(K * U dSe^T)) + dkk K + dkk^T K +
//      dP^T Q (out).
//  13. per row: dbeta, pre's and suf's weights; XG's column sums from the bottom; dg (delta_bwd.h's bwd_finish
//      order).
// Row sums across a tile's columns: a shuffle over the quad of lanes that holds a row, then one partial per
// 64-column tile in shared memory, added in the tiles' order. Thirteen barriers; about 222 KiB of shared memory at
// D = E = 128 (one block per SM).
#include "delta_grad16.h"
#include "delta_prep.h"  // gate_parts, wy_a16, invert_unit_lower64
#include "mma.cuh"
#include "mma_tiles.cuh"  // store_frag

namespace lasp {
namespace cuda {
namespace {

constexpr int kC = 64, kThreads = 256, kLdG = kC + 1, kLdC = kC + 8;

template <int D, int E>
struct Grad16Layout {
  static constexpr int kLdD = D + 8, kLdE = E + 8;
  static constexpr size_t q = 0;  // byte offsets
  static constexpr size_t k = q + (size_t)kC * kLdD * 2;
  static constexpr size_t v = k + (size_t)kC * kLdD * 2;   // step 11 on: dkk (rows of kLdC)
  static constexpr size_t dO = v + (size_t)kC * kLdE * 2;  // step 8 on: dRv (rows of kLdE)
  static constexpr size_t u = dO + (size_t)kC * kLdE * 2;
  static constexpr size_t du = u + (size_t)kC * kLdE * 2;   // step 10 on: X (rows of kLdC)
  static constexpr size_t sb = du + (size_t)kC * kLdE * 2;  // step 7 on: dWk, step 9 on: dRk (rows of kLdD)
  static constexpr size_t dse = sb + (size_t)D * kLdE * 2;
  static constexpr size_t gam = dse + (size_t)D * kLdE * 2;    // fp32, rows of kLdG; step 11 on: XG
  static constexpr size_t a = gam + (size_t)kC * kLdG * 4;     // fp32; step 4 on: Minv in 16 bits (rows of kLdC)
  static constexpr size_t minv = a + (size_t)kC * kLdG * 4;    // fp32; step 5 on: dP in 16 bits (rows of kLdC)
  static constexpr size_t vec = minv + (size_t)kC * kLdG * 4;  // fp32: g, beta, pre, suf, then 5 x 2 x kC partials
  static constexpr size_t bytes = vec + (size_t)(14 * kC + 8) * 4;
  static_assert((size_t)kC * kLdD <= (size_t)D * kLdE, "dWk and dRk fit over Sb");
  static_assert(kLdC <= kLdE, "X and dkk fit over dU and V");
  static_assert((size_t)kC * kLdC * 2 <= (size_t)kC * kLdG * 4, "Minv and dP in 16 bits fit over fp32 tiles");
};

// The sum of v over the four lanes of a quad (the lanes holding one row of an mma fragment).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// A fragment tile's pairs rounded to 16 bits into shared memory (rows of ld), times f where given.
template <typename T16, int NT>
__device__ __forceinline__ void put16(const float (&x)[NT][4], T16* s, int ld, int m0, int n0, float f = 1.f) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, cq = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      *reinterpret_cast<uint32_t*>(s + (m0 + gq + 8 * hh) * ld + n0 + 8 * nt + 2 * cq) =
          mma::pack2<T16>(f * x[nt][2 * hh], f * x[nt][2 * hh + 1]);
}

// rowsum(Y * X) over the tile's columns, X (16-bit, rows of ld) at the tile's entries, into part[row] (one writer
// per row: the quad's first lane).
template <typename T16, int NT>
__device__ __forceinline__ void row_dot(const float (&y)[NT][4], const T16* s, int ld, int m0, int n0, float* part) {
  const int lane = threadIdx.x & 31, gq = lane >> 2, cq = lane & 3;
  float p[2] = {0.f, 0.f};
#pragma unroll
  for (int hh = 0; hh < 2; ++hh)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float2 x =
          mma::unpack2<T16>(*reinterpret_cast<const uint32_t*>(s + (m0 + gq + 8 * hh) * ld + n0 + 8 * nt + 2 * cq));
      p[hh] += x.x * y[nt][2 * hh] + x.y * y[nt][2 * hh + 1];
    }
  p[0] = quad_sum(p[0]);
  p[1] = quad_sum(p[1]);
  if (cq == 0) part[m0 + gq] = p[0], part[m0 + gq + 8] = p[1];
}

// A 16 x 64 fragment tile (rows m0.., columns c0..) to the rows of (b, h) from token n0 of an output with strides
// s (b, h, n): in T16 where o16, else fp32; rows past `rows` left out.
template <typename T16>
__device__ __forceinline__ void store_out(const float (&acc)[8][4], void* out, bool o16, const int64_t* s, int64_t b,
                                          int64_t h, int64_t n0, int m0, int c0, int rows) {
  const int64_t off = b * s[0] + h * s[1] + n0 * s[2];
  if (o16) {
    mma::store_frag<T16, 8>(acc, static_cast<T16*>(out) + off, s[2], m0, c0, rows, c0 + 64);
  } else {
    mma::store_frag<float, 8>(acc, static_cast<float*>(out) + off, s[2], m0, c0, rows, c0 + 64);
  }
}

template <typename T16, int D, int E>
__global__ void __launch_bounds__(kThreads, 1) grad16_kernel(Grad16Args a) {
  using L = Grad16Layout<D, E>;
  constexpr int LdD = L::kLdD, LdE = L::kLdE, DT = D / 64, ET = E / 64;
  extern __shared__ __align__(16) unsigned char sm[];
  T16* sQ = reinterpret_cast<T16*>(sm + L::q);
  T16* sK = reinterpret_cast<T16*>(sm + L::k);
  T16* sV = reinterpret_cast<T16*>(sm + L::v);
  T16* sdO = reinterpret_cast<T16*>(sm + L::dO);
  T16* sU = reinterpret_cast<T16*>(sm + L::u);
  T16* sdU = reinterpret_cast<T16*>(sm + L::du);
  T16* sSb = reinterpret_cast<T16*>(sm + L::sb);
  T16* sdSe = reinterpret_cast<T16*>(sm + L::dse);
  float* sGam = reinterpret_cast<float*>(sm + L::gam);
  float* sA = reinterpret_cast<float*>(sm + L::a);
  float* sMi = reinterpret_cast<float*>(sm + L::minv);
  T16* sMi16 = reinterpret_cast<T16*>(sm + L::a);
  T16* sDP = reinterpret_cast<T16*>(sm + L::minv);
  T16* sDkk = sV;
  T16* sDRv = sdO;
  T16* sX = sdU;
  T16* sW = sSb;  // dWk, then dRk
  float* sg = reinterpret_cast<float*>(sm + L::vec);
  float* sbeta = sg + kC;
  float* spre = sbeta + kC;
  float* ssuf = spre + kC;
  float* sP1 = ssuf + kC;      // rowsum(Q * dO Sb^T), per 64-column tile
  float* sP2 = sP1 + 2 * kC;   // rowsum(K * U dSe^T)
  float* sRK = sP2 + 2 * kC;   // rowsum(dRk * K)
  float* sRV = sRK + 2 * kC;   // rowsum(dRv * V)
  float* sRA = sRV + 2 * kC;   // rowsum(dA * Gam * K K^T), per 32-column tile
  float* sred = sRA + 2 * kC;  // sum(dSe * Sb), per warp

  const int t = threadIdx.x, w = t >> 5, lane = t & 31, gq = lane >> 2, cq = lane & 3;
  const int64_t nc = (a.N + kC - 1) / kC, c = blockIdx.x % nc, bh = blockIdx.x / nc, b = bh / a.H, h = bh % a.H;
  const int64_t n0 = c * kC, tok = bh * a.N + n0;
  const int rows = (int)(a.N - n0 < kC ? a.N - n0 : kC);
  const T16* q = static_cast<const T16*>(a.q) + b * a.qs[0] + (h / a.qgroup) * a.qs[1] + n0 * a.qs[2];
  const T16* k = static_cast<const T16*>(a.k) + b * a.ks[0] + (h / a.kgroup) * a.ks[1] + n0 * a.ks[2];
  const T16* v = static_cast<const T16*>(a.v) + b * a.vs[0] + (h / a.vgroup) * a.vs[1] + n0 * a.vs[2];
  const T16* dO = static_cast<const T16*>(a.dout) + b * a.ds[0] + h * a.ds[1] + n0 * a.ds[2];
  const T16* u = static_cast<const T16*>(a.u) + tok * E;
  const T16* du = static_cast<const T16*>(a.du) + tok * E;
  const T16* sb = static_cast<const T16*>(a.sb) + (bh * nc + c) * D * E;
  const T16* dse = static_cast<const T16*>(a.dse) + (bh * nc + c) * D * E;

  const bool given = a.minv != nullptr;
  // L.
  mma::cp_rows(sK, LdD, k, a.ks[2], rows, kC, D, t, kThreads);
  if (given) mma::cp_rows(sMi16, kLdC, static_cast<const T16*>(a.minv) + tok * kC, kC, rows, kC, kC, t, kThreads);
  mma::cp_async_commit();
  mma::cp_rows(sQ, LdD, q, a.qs[2], rows, kC, D, t, kThreads);
  mma::cp_rows(sdO, LdE, dO, a.ds[2], rows, kC, E, t, kThreads);
  mma::cp_rows(sU, LdE, u, E, rows, kC, E, t, kThreads);
  mma::cp_async_commit();
  mma::cp_rows(sSb, LdE, sb, E, D, D, E, t, kThreads);
  mma::cp_rows(sdSe, LdE, dse, E, D, D, E, t, kThreads);
  mma::cp_rows(sdU, LdE, du, E, rows, kC, E, t, kThreads);
  mma::cp_rows(sV, LdE, v, a.vs[2], rows, kC, E, t, kThreads);
  mma::cp_async_commit();
  if (t < kC) {
    sg[t] = t < rows ? a.g[tok + t] : 0.f;
    sbeta[t] = t < rows ? a.beta[tok + t] : 0.f;
  }
  mma::cp_async_wait<2>();
  __syncthreads();
  if (given && t < kC && t >= rows) sMi16[t * kLdC + t] = static_cast<T16>(1.f);  // m's rows past N: identity
  // 1.
  gate_parts<float>(
      t, kThreads, kC, sg, true, [&](int i, int j, float x) { sGam[i * kLdG + j] = x; },
      [&](int i, float p) { spre[i] = p; });
  __syncthreads();
  // 2.
  if (t < kC) ssuf[t] = sGam[(kC - 1) * kLdG + t];
  if (!given) {
    wy_a16(sK, LdD, D, sbeta, sGam, sA, kLdG);
    __syncthreads();
    invert_unit_lower64(sA, sMi, kLdG);  // 3. (ends with a barrier)
    // 4.
    for (int e = t; e < kC * kC; e += kThreads) {
      const int i = e / kC, j = e % kC;
      sMi16[i * kLdC + j] = static_cast<T16>(sMi[i * kLdG + j]);
    }
  }
  mma::cp_async_wait<1>();
  __syncthreads();
  // The C x C tiles: warp w has rows cm0 .. cm0 + 15, columns cn0 .. cn0 + 31; `low` where the tile reaches the
  // diagonal or below (the others are wholly above it).
  const int cm0 = (w & 3) * 16, cn0 = (w >> 2) * 32;
  const bool low = cn0 <= cm0 + 15;
  float xg[4][4];
  {  // 5.
    float dp[4][4] = {}, qk[4][4] = {};
    if (low) {
      mma::mac<false, true>(dp, sdO, LdE, sU, LdE, cm0, cn0, 0, E);
      mma::mac<false, true>(qk, sQ, LdD, sK, LdD, cm0, cn0, 0, D);
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = cm0 + gq + (e >> 1) * 8, j = cn0 + 8 * nt + 2 * cq + (e & 1);
        dp[nt][e] *= j <= i ? a.scale * sGam[i * kLdG + j] : 0.f;
        xg[nt][e] = dp[nt][e] * qk[nt][e];
      }
    put16<T16>(dp, sDP, kLdC, cm0, cn0);
  }
  mma::cp_async_wait<0>();
  __syncthreads();
  // The C x D tiles: warp w < 4 D / 64 has rows dm0 .. dm0 + 15, columns dn0 .. dn0 + 63 (the C x E tiles alike).
  const bool dj = w < 4 * DT, ej = w < 4 * ET;
  const int m0 = (w & 3) * 16, dct = w >> 2, n0c = dct * 64;
  float dk[8][4] = {};
  float wk[8][4] = {};
  if (dj) {  // 6.
    float y[8][4] = {};
    for (int k0 = 0; k0 < E; k0 += 16) {
      uint32_t a1[4], a2[4], bf[4];
      mma::load_a(a1, sdO, LdE, m0, k0);
      mma::load_a(a2, sdU, LdE, m0, k0);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        mma::load_b_nk(bf, sSb, LdE, k0, n0c + 16 * np);
        mma::mma16816<T16>(y[2 * np], a1, bf[0], bf[1]);
        mma::mma16816<T16>(y[2 * np + 1], a1, bf[2], bf[3]);
        mma::mma16816<T16>(wk[2 * np], a2, bf[0], bf[1]);
        mma::mma16816<T16>(wk[2 * np + 1], a2, bf[2], bf[3]);
      }
    }
    row_dot<T16>(y, sQ, LdD, m0, n0c, sP1 + dct * kC);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) y[nt][e] *= a.scale * spre[m0 + gq + (e >> 1) * 8];
    mma::mac<false, false>(y, sDP, kLdC, sK, LdD, m0, n0c, 0, m0 + 16);  // dP[i, j] = 0 for j > i
    store_out<T16>(y, a.dq, a.out16 & 1, a.dqs, b, h, n0, m0, n0c, rows);
  }
  {
    float s = 0.f;
    for (int e = t; e < D * (E / 2); e += kThreads) {
      const int r = e / (E / 2), x = (e - r * (E / 2)) * 2;
      const float2 p = mma::unpack2<T16>(*reinterpret_cast<const uint32_t*>(sdSe + r * LdE + x));
      const float2 o = mma::unpack2<T16>(*reinterpret_cast<const uint32_t*>(sSb + r * LdE + x));
      s += p.x * o.x + p.y * o.y;
    }
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) sred[w] = s;
  }
  __syncthreads();
  if (dj) put16<T16>(wk, sW, LdD, m0, n0c, -1.f);  // 7.
  __syncthreads();
  // 8.
  if (dj) {
    mma::mac<true, false>(dk, sMi16, kLdC, sW, LdD, m0, n0c, m0, kC);  // Minv^T is upper triangular
    row_dot<T16>(dk, sK, LdD, m0, n0c, sRK + dct * kC);
  }
  if (ej) {
    float r[8][4] = {};
    mma::mac<true, false>(r, sMi16, kLdC, sdU, LdE, m0, n0c, m0, kC);
    row_dot<T16>(r, sV, LdE, m0, n0c, sRV + dct * kC);
    put16<T16>(r, sDRv, LdE, m0, n0c);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) r[nt][e] *= sbeta[m0 + gq + (e >> 1) * 8];
    store_out<T16>(r, a.dv, a.out16 & 4, a.dvs, b, h, n0, m0, n0c, rows);
  }
  __syncthreads();
  if (dj) put16<T16>(dk, sW, LdD, m0, n0c);  // 9.
  __syncthreads();
  float kk[4][4] = {};
  {  // 10.
    float t1[4][4] = {}, t2[4][4] = {};
    if (low) {
      mma::mac<false, true>(t1, sDRv, LdE, sV, LdE, cm0, cn0, 0, E);
      mma::mac<false, true>(t2, sW, LdD, sK, LdD, cm0, cn0, 0, D);
      mma::mac<false, true>(kk, sK, LdD, sK, LdD, cm0, cn0, 0, D);
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int l = cn0 + 8 * nt + 2 * cq + (e & 1);
        t1[nt][e] = sbeta[l] * (t1[nt][e] + spre[l] * t2[nt][e]);
      }
    put16<T16>(t1, sX, kLdC, cm0, cn0);
  }
  __syncthreads();
  {  // 11.
    float da[4][4] = {};
    if (low) mma::mac<false, true>(da, sX, kLdC, sMi16, kLdC, cm0, cn0, 0, cn0 + 32);  // Minv[j, l] = 0 for l > j
    float ra[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = cm0 + gq + (e >> 1) * 8, j = cn0 + 8 * nt + 2 * cq + (e & 1);
        const float gm = sGam[i * kLdG + j], d = j < i ? -da[nt][e] : 0.f, kkg = gm * kk[nt][e];
        ra[e >> 1] += d * kkg;
        sGam[i * kLdG + j] = xg[nt][e] + sbeta[i] * d * kkg;
        da[nt][e] = sbeta[i] * d * gm;
      }
    put16<T16>(da, sDkk, kLdC, cm0, cn0);
    ra[0] = quad_sum(ra[0]);
    ra[1] = quad_sum(ra[1]);
    if (cq == 0) sRA[(w >> 2) * kC + cm0 + gq] = ra[0], sRA[(w >> 2) * kC + cm0 + gq + 8] = ra[1];
  }
  __syncthreads();
  if (dj) {  // 12.
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = m0 + gq + (e >> 1) * 8;
        dk[nt][e] *= sbeta[i] * spre[i];
      }
    float y[8][4] = {};
    mma::mac<false, true>(y, sU, LdE, sdSe, LdE, m0, n0c, 0, E);
    row_dot<T16>(y, sK, LdD, m0, n0c, sP2 + dct * kC);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[nt][e] += ssuf[m0 + gq + (e >> 1) * 8] * y[nt][e];
    mma::mac<false, false>(dk, sDkk, kLdC, sK, LdD, m0, n0c, 0, m0 + 16);  // dkk[j, i] = 0 for i >= j
    mma::mac<true, false>(dk, sDkk, kLdC, sK, LdD, m0, n0c, m0, kC);       // dkk^T[j, i] = 0 for i <= j
    mma::mac<true, false>(dk, sDP, kLdC, sQ, LdD, m0, n0c, m0, kC);        // dP^T[j, i] = 0 for i < j
    store_out<T16>(dk, a.dk, a.out16 & 2, a.dks, b, h, n0, m0, n0c, rows);
  }
  __syncthreads();
  // 13. per row: dbeta; Xp's weight (pre's gradient over pre) into sP1, Xs into sP2
  float* sdpre = sP1;
  float* sxs = sP2;
  if (t < kC) {
    float rk = 0.f, rv = 0.f, p1 = 0.f, p2 = 0.f;
    for (int x = 0; x < DT; ++x) rk += sRK[x * kC + t], p1 += sP1[x * kC + t], p2 += sP2[x * kC + t];
    for (int x = 0; x < ET; ++x) rv += sRV[x * kC + t];
    const float ra = sRA[t] + sRA[kC + t];
    if (t < rows) a.dbeta[tok + t] = rv + spre[t] * rk + ra;
    sdpre[t] = a.scale * p1 + sbeta[t] * rk;
    sxs[t] = ssuf[t] * p2;
  }
  __syncthreads();
  if (t < kC) {  // XG's column sums from the bottom, in place; the last row's state term
    xg_column_suffix(sGam, kLdG, kC, t);
    if (t == 0) {
      float s = 0.f;
      for (int x = 0; x < kThreads / 32; ++x) s += sred[x];
      sdpre[kC - 1] += s;
    }
  }
  __syncthreads();
  if (t < rows) a.dg[tok + t] = dg_row(spre, sdpre, sGam, kLdG, sxs, kC, t);
}

template <typename T16, int D, int E>
cudaError_t launch(const Grad16Args& a, cudaStream_t st) {
  constexpr size_t smem = Grad16Layout<D, E>::bytes;
  const cudaError_t e =
      cudaFuncSetAttribute(grad16_kernel<T16, D, E>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  const int64_t chunks = a.B * a.H * ((a.N + kC - 1) / kC);
  grad16_kernel<T16, D, E><<<(unsigned)chunks, kThreads, smem, st>>>(a);
  return cudaGetLastError();
}

template <typename T16>
cudaError_t launch_dims(const Grad16Args& a, cudaStream_t st) {
  if (a.D == 128) return a.E == 128 ? launch<T16, 128, 128>(a, st) : launch<T16, 128, 64>(a, st);
  return a.E == 128 ? launch<T16, 64, 128>(a, st) : launch<T16, 64, 64>(a, st);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool delta_grad16_takes(const Grad16Args& a) {
  return (a.D == 64 || a.D == 128) && (a.E == 64 || a.E == 128) && a.B >= 0 && a.H >= 1 && a.N >= 0 && a.qgroup >= 1 &&
         a.kgroup >= 1 && a.vgroup >= 1 && mma::rows_on_16_bytes(a.q, a.qs) && mma::rows_on_16_bytes(a.k, a.ks) &&
         mma::rows_on_16_bytes(a.v, a.vs) && mma::rows_on_16_bytes(a.dout, a.ds) && aligned16(a.u) && aligned16(a.du) &&
         aligned16(a.sb) && aligned16(a.dse) && aligned16(a.minv) && a.g && a.beta && a.dq && a.dk && a.dv && a.dbeta &&
         a.dg && mma::rows_on_16_bytes(a.dq, a.dqs) && mma::rows_on_16_bytes(a.dk, a.dks) &&
         mma::rows_on_16_bytes(a.dv, a.dvs) && a.B * a.H * ((a.N + kC - 1) / kC) <= INT32_MAX;
}

cudaError_t delta_grad16(const Grad16Args& a, cudaStream_t st) {
  if (!delta_grad16_takes(a)) return cudaErrorInvalidValue;
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  return a.bf16 ? launch_dims<__nv_bfloat16>(a, st) : launch_dims<__half>(a, st);
}

}  // namespace cuda
}  // namespace lasp
