// The gradients of the gated delta rule's chunked form per chunk, after the backward's chain of state
// gradients and its transposed solve (csrc/delta.cpp, bwd_impl, states them as ATen operations): one block
// program per chunk for the device (delta_kernels.cu) and the host (tests/cpp), as delta_chain.h. Torch-free.
//
// For one chunk, from q, k (C x D), v (C x E), beta, pre (C), gam, kk (C x C), W = [Wv | Wk] (C x (E + D)),
// the state entering the chunk S and the gradient of the one leaving it dSe (D x E), U and dO (C x E) and
// dR = [dRv | dRk] (C x (E + D)), with suf = gam's last row:
//   dA  = -(dR W^T), strictly lower;   dP = scale dO U^T;   dPg = dP * gam;   dkk = diag(beta) dA * gam
//   dq  = scale diag(pre) dO S^T + dPg K
//   dk  = (dkk + dkk^T) K + dPg^T Q + diag(suf) U dSe^T + diag(beta pre) dRk
//   dv  = diag(beta) dRv
//   dbeta = rowsum(dRv * V) + pre rowsum(dRk * K) + rowsum(dA * gam * kk)
//   dg  from XG = gam * (dP * (Q K^T) + diag(beta) dA * kk), Xp = pre (scale rowsum(Q * dO S^T) + beta
//       rowsum(dRk * K), + sum(dSe * S) at the last row), Xs = suf rowsum(K * U dSe^T):
//       dg[t] = sum_{i >= t} Xp[i] + sum_{j < t} sum_{i >= t} XG[i, j] + sum_{j < t} Xs[j]
// The C x C matrices live in shared memory; the operand read across a warp's lanes by rows (K, W, U, S^T,
// dSe^T) is staged in one shared buffer in turn (odd row lengths: no bank conflicts), the other operand read
// from global memory as broadcasts (a warp's 8 rows) or coalesced rows. C x C products in 8 x 2 register
// tiles per thread, C x D ones in 8 x 8 (the 8 rows shared by a warp; delta_tiles.h). The row sums that span a warp's
// lanes go through per-lane partials in shared memory (no warp shuffles: the host runs the same program).
#pragma once
#include <cstdint>

#include "delta_chain.h"  // LASP_CHAIN_HD, HostExec
#include "delta_tiles.h"
#include "warp_tile.h"

namespace lasp {
namespace cuda {

constexpr int kBwdThreads = 256;  // 8 warps: the tiles below assume exactly this many
constexpr int kBwdMaxC = 64;

// Contiguous row-major arrays, chunks = B * H * nc.
template <typename T>
struct BwdArgs {
  int64_t chunks = 0;
  int C = 0, D = 0, E = 0;
  T scale = 1;
  const T* q = nullptr;       // (chunks, C, D)
  const T* k = nullptr;       // (chunks, C, D)
  const T* v = nullptr;       // (chunks, C, E)
  const T* beta = nullptr;    // (chunks, C)
  const T* pre = nullptr;     // (chunks, C)
  const T* gam = nullptr;     // (chunks, C, C), 0 above the diagonal
  const T* kk = nullptr;      // (chunks, C, C)
  const T* w = nullptr;       // (chunks, C, E + D)
  const T* S = nullptr;       // (chunks, D, E)
  const T* dSe = nullptr;     // (chunks, D, E)
  const T* u = nullptr;       // (chunks, C, E)
  const T* dO = nullptr;      // (chunks, C, E)
  const T* dR = nullptr;      // (chunks, C, E + D)
  T* dq = nullptr;            // (chunks, C, D)
  T* dk = nullptr;            // (chunks, C, D)
  T* dv = nullptr;            // (chunks, C, E)
  T* dbeta = nullptr;         // (chunks, C)
  T* dg = nullptr;            // (chunks, C)
  bool tensor_cores = false;  // float, C a multiple of 16: bwd_tc_block (tf32 products; the inputs were 16-bit)
};

struct BwdLayout {
  int ldd, lde, ldw, ldc;
  size_t stage, xg, da, dp, dk, b, p, suf, dpre, xs, part1, part2, part3, elems;
  LASP_CHAIN_HD BwdLayout(int C, int D, int E) {
    ldd = D | 1;
    lde = E | 1;
    ldw = (E + D) | 1;
    ldc = C | 1;
    const size_t st1 = (size_t)C * ldw, st2 = (size_t)E * ldd;  // W (the widest C-row operand); S^T, dSe^T
    stage = 0;
    xg = stage + (st1 > st2 ? st1 : st2);
    da = xg + (size_t)C * ldc;
    dp = da + (size_t)C * ldc;
    dk = dp + (size_t)C * ldc;
    b = dk + (size_t)C * ldc;
    p = b + C;
    suf = p + C;
    dpre = suf + C;
    xs = dpre + C;
    part1 = xs + C;
    part2 = part1 + (size_t)C * 32;
    part3 = part2 + (size_t)C * 32;
    elems = part3 + kBwdThreads;
  }
};

template <typename T>
LASP_CHAIN_HD size_t bwd_smem_bytes(int C, int D, int E) {
  return sizeof(T) * BwdLayout(C, D, E).elems;
}

// The gradient programs' last phases (the SIMT and the tensor-core forms): dv; per row dbeta, dpre and Xs
// (P1(i) = rowsum(Q * dO S^T)[i], P2(i) = rowsum(K * U dSe^T)[i]); XG's column sums from the bottom (in place in
// sXG); dg. part3: kBwdThreads elements of shared memory for the partials of sum(dSe * S). Begins with the
// block's barrier (after the caller's last phase).
template <typename T, typename F1, typename F2, typename Exec>
LASP_CHAIN_HD void bwd_finish(const BwdArgs<T>& a, int64_t ch, T* part3, T* sXG, int ldxg, const T* sDA, int ldda,
                              const T* sb, const T* sp, const T* ssuf, T* sdpre, T* sxs, F1 P1, F2 P2, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E, WD = E + D;
  const size_t ce = (size_t)ch * C * E, c1 = (size_t)ch * C;
  const T* K = a.k + (size_t)ch * C * D;
  const T* V = a.v + ce;
  const T* G = a.gam + (size_t)ch * C * C;
  const T* KK = a.kk + (size_t)ch * C * C;
  const T* S = a.S + (size_t)ch * D * E;
  const T* dSe = a.dSe + (size_t)ch * D * E;
  const T* dR = a.dR + (size_t)ch * C * WD;
  ex.sync();
  ex.threads([&](int t) {  // dv; sum(dSe * S) partials; per row: dbeta, dpre, Xs
    for (int i = t; i < C * E; i += kBwdThreads) a.dv[ce + i] = sb[i / E] * dR[(size_t)(i / E) * WD + i % E];
    T s = 0;
    for (int i = t; i < D * E; i += kBwdThreads) s += dSe[i] * S[i];
    part3[t] = s;
    if (t >= C) return;
    const int i = t;
    T rk = 0, rv = 0, ra = 0;
    for (int x = 0; x < D; ++x) rk += dR[(size_t)i * WD + E + x] * K[(size_t)i * D + x];
    for (int e = 0; e < E; ++e) rv += dR[(size_t)i * WD + e] * V[(size_t)i * E + e];
    for (int j = 0; j < i; ++j) ra += sDA[i * ldda + j] * G[(size_t)i * C + j] * KK[(size_t)i * C + j];
    a.dbeta[c1 + i] = rv + sp[i] * rk + ra;
    sdpre[i] = a.scale * P1(i) + sb[i] * rk;
    sxs[i] = ssuf[i] * P2(i);
  });
  ex.sync();
  ex.threads([&](int t) {  // XG's column sums from the bottom, in place; the last row's dpre term
    if (t >= C) return;
    xg_column_suffix(sXG, ldxg, C, t);
    if (t == 0) {
      T s = 0;
      for (int l = 0; l < kBwdThreads; ++l) s += part3[l];
      sdpre[C - 1] += s;
    }
  });
  ex.sync();
  ex.threads([&](int t) {  // dg
    if (t < C) a.dg[c1 + t] = dg_row(sp, sdpre, sXG, ldxg, sxs, C, t);
  });
  ex.done();
}

template <typename T, typename Exec>
LASP_CHAIN_HD void bwd_block(const BwdArgs<T>& a, int64_t ch, T* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E, WD = E + D;
  const BwdLayout L(C, D, E);
  T* sSt = smem + L.stage;
  T* sXG = smem + L.xg;
  T* sDA = smem + L.da;
  T* sDP = smem + L.dp;
  T* sDK = smem + L.dk;
  T* sb = smem + L.b;
  T* sp = smem + L.p;
  T* ssuf = smem + L.suf;
  T* sdpre = smem + L.dpre;
  T* sxs = smem + L.xs;
  T* part1 = smem + L.part1;
  T* part2 = smem + L.part2;
  const size_t cd = (size_t)ch * C * D, ce = (size_t)ch * C * E, cw = (size_t)ch * C * WD, cc = (size_t)ch * C * C,
               de = (size_t)ch * D * E, c1 = (size_t)ch * C;
  const T* Q = a.q + cd;
  const T* K = a.k + cd;
  const T* G = a.gam + cc;
  const T* KK = a.kk + cc;
  const T* W = a.w + cw;
  const T* S = a.S + de;
  const T* dSe = a.dSe + de;
  const T* U = a.u + ce;
  const T* dO = a.dO + ce;
  const T* dR = a.dR + cw;

  ex.threads([&](int t) {  // 0. beta, pre, suf; K staged
    for (int i = t; i < C; i += kBwdThreads) {
      sb[i] = a.beta[c1 + i];
      sp[i] = a.pre[c1 + i];
      ssuf[i] = G[(size_t)(C - 1) * C + i];
    }
    for (int i = t; i < C * D; i += kBwdThreads) sSt[(i / D) * L.ldd + i % D] = K[i];
  });
  ex.sync();
  ex.threads([&](int t) {  // 1. Q K^T -> sXG
    cc_tile<T>(
        t, C, D, [&](int i, int x) { return Q[(size_t)i * D + x]; }, [&](int j, int x) { return sSt[j * L.ldd + x]; },
        [&](int i, int j, T v) { sXG[i * L.ldc + j] = v; });
  });
  ex.sync();
  ex.threads([&](int t) {  // 2. W staged
    for (int i = t; i < C * WD; i += kBwdThreads) sSt[(i / WD) * L.ldw + i % WD] = W[i];
  });
  ex.sync();
  ex.threads([&](int t) {  // 3. dA = -(dR W^T), strictly lower
    cc_tile<T>(
        t, C, WD, [&](int i, int x) { return dR[(size_t)i * WD + x]; },
        [&](int j, int x) { return sSt[j * L.ldw + x]; },
        [&](int i, int j, T v) { sDA[i * L.ldc + j] = j < i ? -v : T(0); });
  });
  ex.sync();
  ex.threads([&](int t) {  // 4. U staged
    for (int i = t; i < C * E; i += kBwdThreads) sSt[(i / E) * L.lde + i % E] = U[i];
  });
  ex.sync();
  ex.threads([&](int t) {  // 5. dP = scale dO U^T; dPg, dkk, XG
    cc_tile<T>(
        t, C, E, [&](int i, int x) { return dO[(size_t)i * E + x]; }, [&](int j, int x) { return sSt[j * L.lde + x]; },
        [&](int i, int j, T v) {
          const T dP = v * a.scale;
          const T g = j <= i ? G[(size_t)i * C + j] : T(0);
          const T dab = sDA[i * L.ldc + j] * sb[i];  // 0 on and above the diagonal
          sDP[i * L.ldc + j] = dP * g;
          sDK[i * L.ldc + j] = dab * g;
          sXG[i * L.ldc + j] = g * (dP * sXG[i * L.ldc + j] + dab * KK[(size_t)i * C + j]);
        });
  });
  ex.sync();
  ex.threads([&](int t) {  // 6. S^T staged
    for (int i = t; i < D * E; i += kBwdThreads) sSt[(i % E) * L.ldd + i / E] = S[i];
  });
  ex.sync();
  ex.threads([&](int t) {  // 7. dq = scale pre dO S^T + dPg K; partials of rowsum(Q * dO S^T)
    const RowTile rt(t, C);
    if (rt.r0 >= C) return;
    const int jmax = rt.r0 + 8 < C ? rt.r0 + 8 : C;  // dPg is 0 right of its diagonal
    T part[8] = {};
    for (int base = 0; base < D; base += 256) {
      T acc[8][8] = {};
      tile_mac(
          acc, rt, 0, E, base, D, [&](int i, int e) { return dO[(size_t)i * E + e]; },
          [&](int e, int col) { return sSt[e * L.ldd + col]; });
      for (int r = 0; r < 8; ++r) {
        const T f = a.scale * sp[rt.rr[r]];
        for (int n = 0; n < 8; ++n) {
          const int col = rt.col(base, n);
          if (col < D) part[r] += Q[(size_t)rt.rr[r] * D + col] * acc[r][n];
          acc[r][n] *= f;
        }
      }
      tile_mac(
          acc, rt, 0, jmax, base, D, [&](int i, int j) { return sDP[i * L.ldc + j]; },
          [&](int j, int col) { return K[(size_t)j * D + col]; });
      tile_store(acc, rt, C, base, D, [&](int i, int col, T v) { a.dq[cd + (size_t)i * D + col] = v; });
    }
    for (int r = 0; r < 8 && rt.r0 + r < C; ++r) part1[(rt.r0 + r) * 32 + rt.lane] = part[r];
  });
  ex.sync();
  ex.threads([&](int t) {  // 8. dSe^T staged
    for (int i = t; i < D * E; i += kBwdThreads) sSt[(i % E) * L.ldd + i / E] = dSe[i];
  });
  ex.sync();
  ex.threads([&](int t) {  // 9. dk = suf U dSe^T + beta pre dRk + (dkk + dkk^T) K + dPg^T Q; partials of
                           //    rowsum(K * U dSe^T)
    const RowTile rt(t, C);
    if (rt.r0 >= C) return;
    T part[8] = {};
    for (int base = 0; base < D; base += 256) {
      T acc[8][8] = {};
      tile_mac(
          acc, rt, 0, E, base, D, [&](int j, int e) { return U[(size_t)j * E + e]; },
          [&](int e, int col) { return sSt[e * L.ldd + col]; });
      for (int r = 0; r < 8; ++r) {
        const int j = rt.rr[r];
        const T f = ssuf[j], bp = sb[j] * sp[j];
        for (int n = 0; n < 8; ++n) {
          const int col = rt.col(base, n);
          if (col >= D) continue;
          part[r] += K[(size_t)j * D + col] * acc[r][n];
          acc[r][n] = f * acc[r][n] + bp * dR[(size_t)j * WD + E + col];
        }
      }
      tile_mac(
          acc, rt, 0, C, base, D, [&](int j, int i) { return sDK[j * L.ldc + i] + sDK[i * L.ldc + j]; },
          [&](int i, int col) { return K[(size_t)i * D + col]; });
      tile_mac(  // dPg[i, j] = 0 for i < j: rows i >= the tile's first only
          acc, rt, rt.r0, C, base, D, [&](int j, int i) { return sDP[i * L.ldc + j]; },
          [&](int i, int col) { return Q[(size_t)i * D + col]; });
      tile_store(acc, rt, C, base, D, [&](int j, int col, T v) { a.dk[cd + (size_t)j * D + col] = v; });
    }
    for (int r = 0; r < 8 && rt.r0 + r < C; ++r) part2[(rt.r0 + r) * 32 + rt.lane] = part[r];
  });
  bwd_finish(
      a, ch, smem + L.part3, sXG, L.ldc, sDA, L.ldc, sb, sp, ssuf, sdpre, sxs,
      [&](int i) {
        T p = 0;
        for (int l = 0; l < 32; ++l) p += part1[i * 32 + l];
        return p;
      },
      [&](int i) {
        T p = 0;
        for (int l = 0; l < 32; ++l) p += part2[i * 32 + l];
        return p;
      },
      ex);
  ex.done();
}

// The tensor-core form of bwd_block (float): the same gradients with tf32 products, one WarpTile per warp and
// job (C x C results in 16 x 32 tiles, C x D ones in 16 x 64), over the same staged operands in shared
// memory with rows of round32(.) + 4 floats (zero past their length, up to a multiple of 8): a fragment's
// 8 x 4 reads of a staged row operand hit 32 banks. The products' row sums (rowsum(Q * dO S^T),
// rowsum(K * U dSe^T)) go through a C x D scratch of the entries, summed per row in order.
struct BwdTcLayout {
  int Dp, Ep, WDp, ldd, lde, ldw, ldc;
  size_t stage, xg, da, dp, dk, scratch, b, p, suf, dpre, xs, p1, part3, elems;
  LASP_CHAIN_HD BwdTcLayout(int C, int D, int E) {
    Dp = (D + 7) / 8 * 8;
    Ep = (E + 7) / 8 * 8;
    WDp = (E + D + 7) / 8 * 8;
    ldd = (D + 31) / 32 * 32 + 4;      // K staged: C rows of D
    lde = (E + 31) / 32 * 32 + 4;      // U: C rows of E; S, dSe: D rows of E
    ldw = (E + D + 31) / 32 * 32 + 4;  // W: C rows of E + D
    ldc = (C + 31) / 32 * 32 + 4;
    size_t st = (size_t)C * ldw;
    if ((size_t)D * lde > st) st = (size_t)D * lde;
    if ((size_t)C * ldd > st) st = (size_t)C * ldd;
    stage = 0;
    xg = stage + st;
    da = xg + (size_t)C * ldc;
    dp = da + (size_t)C * ldc;
    dk = dp + (size_t)C * ldc;
    scratch = dk + (size_t)C * ldc;
    b = scratch + (size_t)C * D;
    p = b + C;
    suf = p + C;
    dpre = suf + C;
    xs = dpre + C;
    p1 = xs + C;
    part3 = p1 + C;
    elems = part3 + kBwdThreads;
  }
};

LASP_CHAIN_HD size_t bwd_tc_smem_bytes(int C, int D, int E) { return sizeof(float) * BwdTcLayout(C, D, E).elems; }

template <typename Exec>
LASP_CHAIN_HD void bwd_tc_block(const BwdArgs<float>& a, int64_t ch, float* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E, WD = E + D;
  const BwdTcLayout L(C, D, E);
  float* sSt = smem + L.stage;
  float* sXG = smem + L.xg;
  float* sDA = smem + L.da;
  float* sDP = smem + L.dp;
  float* sDK = smem + L.dk;
  float* sX = smem + L.scratch;
  float* sb = smem + L.b;
  float* sp = smem + L.p;
  float* ssuf = smem + L.suf;
  float* sp1 = smem + L.p1;
  const size_t cd = (size_t)ch * C * D, ce = (size_t)ch * C * E, cw = (size_t)ch * C * WD, cc = (size_t)ch * C * C,
               de = (size_t)ch * D * E;
  const float* Q = a.q + cd;
  const float* K = a.k + cd;
  const float* G = a.gam + cc;
  const float* KK = a.kk + cc;
  const float* W = a.w + cw;
  const float* S = a.S + de;
  const float* dSe = a.dSe + de;
  const float* U = a.u + ce;
  const float* dO = a.dO + ce;
  const float* dR = a.dR + cw;
  constexpr int kWarps = kBwdThreads / 32;
  const int rtiles = C / 16;
  // stages rows x cols of M (row stride ms) into sSt with rows of ld, zero past cols up to colsp
  auto stage = [&](int t, const float* M, int rows, int cols, int colsp, size_t ms, int ld) {
    for (int i = t; i < rows * colsp; i += kBwdThreads) {
      const int r = i / colsp, x = i % colsp;
      sSt[r * ld + x] = x < cols ? M[r * ms + x] : 0.f;
    }
  };
  // the C x C product tiles: f(i, j, value) for X Y^T, X(i, k) a global row, sSt rows j of length ld
  auto cc_products = [&](int w, int K, const float* X, size_t xs, int xcols, int ld, auto f) {
    const int ctiles = (C + 31) / 32;
    for (int job = w; job < rtiles * ctiles; job += kWarps) {
      const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 32;
      WarpTile<4> tile;
      tile.zero();
      tile.mma(
          K, [&](int m, int k) { return k < xcols ? X[(size_t)(m0 + m) * xs + k] : 0.f; },
          [&](int k, int n) { return n0 + n < C ? sSt[(n0 + n) * ld + k] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        if (n0 + n < C) f(m0 + m, n0 + n, v);
      });
    }
  };

  ex.threads([&](int t) {  // 0. beta, pre, suf; K staged
    for (int i = t; i < C; i += kBwdThreads) {
      sb[i] = a.beta[(size_t)ch * C + i];
      sp[i] = a.pre[(size_t)ch * C + i];
      ssuf[i] = G[(size_t)(C - 1) * C + i];
    }
    stage(t, K, C, D, L.Dp, D, L.ldd);
  });
  ex.sync();
  ex.warps([&](int w) {  // 1. Q K^T -> sXG
    cc_products(w, L.Dp, Q, D, D, L.ldd, [&](int i, int j, float v) { sXG[i * L.ldc + j] = v; });
  });
  ex.sync();
  ex.threads([&](int t) { stage(t, W, C, WD, L.WDp, WD, L.ldw); });  // 2. W staged
  ex.sync();
  ex.warps([&](int w) {  // 3. dA = -(dR W^T), strictly lower
    cc_products(w, L.WDp, dR, WD, WD, L.ldw, [&](int i, int j, float v) { sDA[i * L.ldc + j] = j < i ? -v : 0.f; });
  });
  ex.sync();
  ex.threads([&](int t) { stage(t, U, C, E, L.Ep, E, L.lde); });  // 4. U staged
  ex.sync();
  ex.warps([&](int w) {  // 5. dP = scale dO U^T; dPg, dkk, XG
    cc_products(w, L.Ep, dO, E, E, L.lde, [&](int i, int j, float v) {
      const float dP = v * a.scale;
      const float g = j <= i ? G[(size_t)i * C + j] : 0.f;
      const float dab = sDA[i * L.ldc + j] * sb[i];  // 0 on and above the diagonal
      sDP[i * L.ldc + j] = dP * g;
      sDK[i * L.ldc + j] = dab * g;
      sXG[i * L.ldc + j] = g * (dP * sXG[i * L.ldc + j] + dab * KK[(size_t)i * C + j]);
    });
  });
  ex.sync();
  ex.threads([&](int t) { stage(t, S, D, E, L.Ep, E, L.lde); });  // 6. S staged (rows x, columns e)
  ex.sync();
  const int dtiles = (D + 63) / 64;
  ex.warps([&](int w) {  // 7. dq = scale pre dO S^T + dPg K; the entries of Q * dO S^T
    for (int job = w; job < rtiles * dtiles; job += kWarps) {
      const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 64;
      WarpTile<8> tile;
      tile.zero();
      tile.mma(
          L.Ep, [&](int m, int k) { return k < E ? dO[(size_t)(m0 + m) * E + k] : 0.f; },
          [&](int k, int n) { return n0 + n < D ? sSt[(n0 + n) * L.lde + k] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        const int i = m0 + m, x = n0 + n;
        if (x < D) sX[i * D + x] = Q[(size_t)i * D + x] * v;
        v *= a.scale * sp[i];
      });
      tile.mma(  // dPg is 0 right of its diagonal: columns up to the tile's last row
          m0 + 16, [&](int m, int k) { return sDP[(m0 + m) * L.ldc + k]; },
          [&](int k, int n) { return n0 + n < D ? K[(size_t)k * D + n0 + n] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        if (n0 + n < D) a.dq[cd + (size_t)(m0 + m) * D + n0 + n] = v;
      });
    }
  });
  ex.sync();
  ex.threads([&](int t) {  // 8. rowsum(Q * dO S^T); dSe staged
    if (t < C) {
      float s = 0.f;
      for (int x = 0; x < D; ++x) s += sX[t * D + x];
      sp1[t] = s;
    }
    stage(t, dSe, D, E, L.Ep, E, L.lde);
  });
  ex.sync();
  ex.warps([&](int w) {  // 9. dk = suf U dSe^T + beta pre dRk + (dkk + dkk^T) K + dPg^T Q; entries of K * U dSe^T
    for (int job = w; job < rtiles * dtiles; job += kWarps) {
      const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 64;
      WarpTile<8> tile;
      tile.zero();
      tile.mma(
          L.Ep, [&](int m, int k) { return k < E ? U[(size_t)(m0 + m) * E + k] : 0.f; },
          [&](int k, int n) { return n0 + n < D ? sSt[(n0 + n) * L.lde + k] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        const int j = m0 + m, x = n0 + n;
        if (x >= D) return;
        sX[j * D + x] = K[(size_t)j * D + x] * v;
        v = ssuf[j] * v + sb[j] * sp[j] * dR[(size_t)j * WD + E + x];
      });
      tile.mma(
          C, [&](int m, int k) { return sDK[(m0 + m) * L.ldc + k] + sDK[k * L.ldc + m0 + m]; },
          [&](int k, int n) { return n0 + n < D ? K[(size_t)k * D + n0 + n] : 0.f; });
      tile.mma(  // dPg[i, j] = 0 for i < j: rows i from the tile's first
          C - m0, [&](int m, int k) { return sDP[(m0 + k) * L.ldc + m0 + m]; },
          [&](int k, int n) { return n0 + n < D ? Q[(size_t)(m0 + k) * D + n0 + n] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        if (n0 + n < D) a.dk[cd + (size_t)(m0 + m) * D + n0 + n] = v;
      });
    }
  });
  bwd_finish(
      a, ch, smem + L.part3, sXG, L.ldc, sDA, L.ldc, sb, sp, ssuf, smem + L.dpre, smem + L.xs,
      [&](int i) { return sp1[i]; },
      [&](int i) {
        float p = 0.f;
        for (int x = 0; x < D; ++x) p += sX[i * D + x];
        return p;
      },
      ex);
  ex.done();
}

// The parts of the backward's chain inputs that do not depend on the state gradients, per chunk:
//   pdo = scale (Q K^T * gam)^T dO  (C x E),   qdo = scale Q^T diag(pre) dO  (D x E)
// K staged in shared memory (odd row lengths) for P = Q K^T * gam (kept in shared memory), then 8 x 8
// register tiles: pdo's rows j over P's rows i >= j, qdo's rows (groups of 8 dealt to the warps) over the
// chunk's tokens; dO's rows read coalesced, shared by the warps through L1.
template <typename T>
struct ProArgs {
  int64_t chunks = 0;
  int C = 0, D = 0, E = 0;
  T scale = 1;
  const T* q = nullptr;       // (chunks, C, D)
  const T* k = nullptr;       // (chunks, C, D)
  const T* gam = nullptr;     // (chunks, C, C)
  const T* pre = nullptr;     // (chunks, C)
  const T* dO = nullptr;      // (chunks, C, E)
  T* pdo = nullptr;           // (chunks, C, E)
  T* qdo = nullptr;           // (chunks, D, E)
  bool tensor_cores = false;  // float, C a multiple of 16: pro_tc_block
};

struct ProLayout {
  int ldd, ldc;
  size_t k, p, elems;
  LASP_CHAIN_HD ProLayout(int C, int D) {
    ldd = D | 1;
    ldc = C | 1;
    k = 0;
    p = k + (size_t)C * ldd;
    elems = p + (size_t)C * ldc;
  }
};

template <typename T>
LASP_CHAIN_HD size_t pro_smem_bytes(int C, int D) {
  return sizeof(T) * ProLayout(C, D).elems;
}

template <typename T, typename Exec>
LASP_CHAIN_HD void pro_block(const ProArgs<T>& a, int64_t ch, T* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E;
  const ProLayout L(C, D);
  T* sK = smem + L.k;
  T* sP = smem + L.p;
  const T* Q = a.q + (size_t)ch * C * D;
  const T* K = a.k + (size_t)ch * C * D;
  const T* G = a.gam + (size_t)ch * C * C;
  const T* pre = a.pre + (size_t)ch * C;
  const T* dO = a.dO + (size_t)ch * C * E;
  ex.threads([&](int t) {  // 0. K staged
    for (int i = t; i < C * D; i += kBwdThreads) sK[(i / D) * L.ldd + i % D] = K[i];
  });
  ex.sync();
  ex.threads([&](int t) {  // 1. P = Q K^T * gam
    cc_tile<T>(
        t, C, D, [&](int i, int x) { return Q[(size_t)i * D + x]; }, [&](int j, int x) { return sK[j * L.ldd + x]; },
        [&](int i, int j, T v) { sP[i * L.ldc + j] = j <= i ? v * G[(size_t)i * C + j] : T(0); });
  });
  ex.sync();
  ex.threads([&](int t) {  // 2. pdo = scale P^T dO (P[i, j] = 0 for i < j: rows i >= the tile's first)
    const RowTile rt(t, C);
    if (rt.r0 >= C) return;
    for (int base = 0; base < E; base += 256) {
      T acc[8][8] = {};
      tile_mac(
          acc, rt, rt.r0, C, base, E, [&](int j, int i) { return sP[i * L.ldc + j]; },
          [&](int i, int col) { return dO[(size_t)i * E + col]; });
      tile_store(acc, rt, C, base, E,
                 [&](int j, int col, T v) { a.pdo[((size_t)ch * C + j) * E + col] = v * a.scale; });
    }
  });
  ex.threads([&](int t) {  // 3. qdo = scale Q^T diag(pre) dO: rows x in tiles of 64 (8 per warp)
    for (int off = 0; off < D; off += 64) {
      const RowTile rt(t, D, off);
      if (rt.r0 >= D) break;
      for (int base = 0; base < E; base += 256) {
        T acc[8][8] = {};
        tile_mac(
            acc, rt, 0, C, base, E, [&](int x, int i) { return Q[(size_t)i * D + x]; },
            [&](int i, int col) { return pre[i] * dO[(size_t)i * E + col]; });
        tile_store(acc, rt, D, base, E,
                   [&](int x, int col, T v) { a.qdo[((size_t)ch * D + x) * E + col] = v * a.scale; });
      }
    }
  });
  ex.done();
}

// The backward's transposed solve through the WY form, per chunk, with m^-1 at hand (delta_prep.h writes
// it): dR = m^-T [dU | -dU S^T] = [dRv | -dRv S^T], dRv = m^-T dU (m^-1 lower triangular: dRv[i] =
// sum_{j >= i} m^-1[j, i] dU[j]). m^-1 and the staged S^T (odd row lengths) and dRv in shared memory; 8 x 8
// register tiles, the rows shared by a warp.
template <typename T>
struct DrArgs {
  int64_t chunks = 0;
  int C = 0, D = 0, E = 0;
  const T* minv = nullptr;    // (chunks, C, C)
  const T* dU = nullptr;      // (chunks, C, E)
  const T* S = nullptr;       // (chunks, D, E)
  T* dR = nullptr;            // (chunks, C, E + D)
  bool tensor_cores = false;  // float, C a multiple of 16: dr_tc_block
};

struct DrLayout {
  int ldc, lde, ldd;
  size_t t, rv, st, elems;
  LASP_CHAIN_HD DrLayout(int C, int D, int E) {
    ldc = C | 1;
    lde = E | 1;
    ldd = D | 1;
    t = 0;
    rv = t + (size_t)C * ldc;
    st = rv + (size_t)C * lde;
    elems = st + (size_t)E * ldd;
  }
};

template <typename T>
LASP_CHAIN_HD size_t dr_smem_bytes(int C, int D, int E) {
  return sizeof(T) * DrLayout(C, D, E).elems;
}

template <typename T, typename Exec>
LASP_CHAIN_HD void dr_block(const DrArgs<T>& a, int64_t ch, T* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E, WD = E + D;
  const DrLayout L(C, D, E);
  T* sT = smem + L.t;
  T* sRv = smem + L.rv;
  T* sSt = smem + L.st;
  const T* Mi = a.minv + (size_t)ch * C * C;
  const T* dU = a.dU + (size_t)ch * C * E;
  const T* S = a.S + (size_t)ch * D * E;
  T* dR = a.dR + (size_t)ch * C * WD;
  ex.threads([&](int t) {  // 0. m^-1, S^T -> shared memory
    for (int i = t; i < C * C; i += kBwdThreads) sT[(i / C) * L.ldc + i % C] = Mi[i];
    for (int i = t; i < D * E; i += kBwdThreads) sSt[(i % E) * L.ldd + i / E] = S[i];
  });
  ex.sync();
  ex.threads([&](int t) {  // 1. dRv = m^-T dU (m^-1[j, i] = 0 for j < i: rows j >= the tile's first)
    const RowTile rt(t, C);
    if (rt.r0 >= C) return;
    for (int base = 0; base < E; base += 256) {
      T acc[8][8] = {};
      tile_mac(
          acc, rt, rt.r0, C, base, E, [&](int i, int j) { return sT[j * L.ldc + i]; },
          [&](int j, int col) { return dU[(size_t)j * E + col]; });
      tile_store(acc, rt, C, base, E, [&](int i, int col, T v) {
        dR[(size_t)i * WD + col] = v;
        sRv[i * L.lde + col] = v;
      });
    }
  });
  ex.sync();
  ex.threads([&](int t) {  // 2. dRk = -dRv S^T
    const RowTile rt(t, C);
    if (rt.r0 >= C) return;
    for (int base = 0; base < D; base += 256) {
      T acc[8][8] = {};
      tile_mac(
          acc, rt, 0, E, base, D, [&](int i, int e) { return sRv[i * L.lde + e]; },
          [&](int e, int col) { return sSt[e * L.ldd + col]; });
      tile_store(acc, rt, C, base, D, [&](int i, int col, T v) { dR[(size_t)i * WD + E + col] = -v; });
    }
  });
  ex.done();
}


// The tensor-core form of pro_block (float, C a multiple of 16): K staged, P in shared memory, tf32 WarpTiles.
LASP_CHAIN_HD size_t pro_tc_smem_bytes(int C, int D) {
  return sizeof(float) * ((size_t)C * tc_ld(D) + (size_t)C * tc_ld(C));
}

template <typename Exec>
LASP_CHAIN_HD void pro_tc_block(const ProArgs<float>& a, int64_t ch, float* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E, Dp = round8(D), ldd = tc_ld(D), ldc = tc_ld(C);
  float* sK = smem;
  float* sP = smem + (size_t)C * ldd;
  const float* Q = a.q + (size_t)ch * C * D;
  const float* K = a.k + (size_t)ch * C * D;
  const float* G = a.gam + (size_t)ch * C * C;
  const float* pre = a.pre + (size_t)ch * C;
  const float* dO = a.dO + (size_t)ch * C * E;
  constexpr int kWarps = kBwdThreads / 32;
  const int rtiles = C / 16;
  ex.threads([&](int t) {  // 0. K staged, zero past D
    for (int i = t; i < C * Dp; i += kBwdThreads) {
      const int r = i / Dp, x = i % Dp;
      sK[r * ldd + x] = x < D ? K[(size_t)r * D + x] : 0.f;
    }
  });
  ex.sync();
  ex.warps([&](int w) {  // 1. P = Q K^T * gam (16 x 32 tiles; those wholly above the diagonal: 0)
    const int ctiles = (C + 31) / 32;
    for (int job = w; job < rtiles * ctiles; job += kWarps) {
      const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 32;
      WarpTile<4> tile;
      tile.zero();
      if (n0 <= m0 + 15)
        tile.mma(
            Dp, [&](int m, int k) { return k < D ? Q[(size_t)(m0 + m) * D + k] : 0.f; },
            [&](int k, int n) { return n0 + n < C ? sK[(n0 + n) * ldd + k] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        const int i = m0 + m, j = n0 + n;
        if (j < C) sP[i * ldc + j] = j <= i ? v * G[(size_t)i * C + j] : 0.f;
      });
    }
  });
  ex.sync();
  ex.warps([&](int w) {  // 2. pdo = scale P^T dO over P's rows i >= the tile's first; 3. qdo
    const int etiles = (E + 63) / 64, xtiles = (D + 15) / 16;
    for (int job = w; job < rtiles * etiles; job += kWarps) {
      const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 64;
      WarpTile<8> tile;
      tile.zero();
      tile.mma(
          C - m0, [&](int m, int k) { return sP[(m0 + k) * ldc + m0 + m]; },
          [&](int k, int n) { return n0 + n < E ? dO[(size_t)(m0 + k) * E + n0 + n] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        if (n0 + n < E) a.pdo[((size_t)ch * C + m0 + m) * E + n0 + n] = v * a.scale;
      });
    }
    for (int job = w; job < xtiles * etiles; job += kWarps) {
      const int x0 = (job % xtiles) * 16, n0 = (job / xtiles) * 64;
      WarpTile<8> tile;
      tile.zero();
      tile.mma(
          C, [&](int m, int k) { return x0 + m < D ? Q[(size_t)k * D + x0 + m] : 0.f; },
          [&](int k, int n) { return n0 + n < E ? pre[k] * dO[(size_t)k * E + n0 + n] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        if (x0 + m < D && n0 + n < E) a.qdo[((size_t)ch * D + x0 + m) * E + n0 + n] = v * a.scale;
      });
    }
  });
  ex.done();
}

// The tensor-core form of dr_block (float, C a multiple of 16): m^-1, S (rows x of E) and dRv staged.
LASP_CHAIN_HD size_t dr_tc_smem_bytes(int C, int D, int E) {
  return sizeof(float) * ((size_t)C * tc_ld(C) + (size_t)C * tc_ld(E) + (size_t)D * tc_ld(E));
}

template <typename Exec>
LASP_CHAIN_HD void dr_tc_block(const DrArgs<float>& a, int64_t ch, float* smem, Exec& ex) {
  const int C = a.C, D = a.D, E = a.E, WD = E + D, Ep = round8(E), ldc = tc_ld(C), lde = tc_ld(E);
  float* sT = smem;
  float* sRv = sT + (size_t)C * ldc;
  float* sS = sRv + (size_t)C * lde;
  const float* Mi = a.minv + (size_t)ch * C * C;
  const float* dU = a.dU + (size_t)ch * C * E;
  const float* S = a.S + (size_t)ch * D * E;
  float* dR = a.dR + (size_t)ch * C * WD;
  constexpr int kWarps = kBwdThreads / 32;
  const int rtiles = C / 16;
  ex.threads([&](int t) {  // 0. m^-1, S (zero past E), dRv's padding columns
    for (int i = t; i < C * C; i += kBwdThreads) sT[(i / C) * ldc + i % C] = Mi[i];
    for (int i = t; i < D * Ep; i += kBwdThreads) {
      const int r = i / Ep, e = i % Ep;
      sS[r * lde + e] = e < E ? S[(size_t)r * E + e] : 0.f;
    }
    for (int i = t; i < C * (Ep - E); i += kBwdThreads) sRv[(i / (Ep - E)) * lde + E + i % (Ep - E)] = 0.f;
  });
  ex.sync();
  ex.warps([&](int w) {  // 1. dRv = m^-T dU over rows j >= the tile's first (m^-1 lower triangular)
    const int etiles = (E + 63) / 64;
    for (int job = w; job < rtiles * etiles; job += kWarps) {
      const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 64;
      WarpTile<8> tile;
      tile.zero();
      tile.mma(
          C - m0, [&](int m, int k) { return sT[(m0 + k) * ldc + m0 + m]; },
          [&](int k, int n) { return n0 + n < E ? dU[(size_t)(m0 + k) * E + n0 + n] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        if (n0 + n >= E) return;
        dR[(size_t)(m0 + m) * WD + n0 + n] = v;
        sRv[(m0 + m) * lde + n0 + n] = v;
      });
    }
  });
  ex.sync();
  ex.warps([&](int w) {  // 2. dRk = -dRv S^T
    const int xtiles = (D + 63) / 64;
    for (int job = w; job < rtiles * xtiles; job += kWarps) {
      const int m0 = (job % rtiles) * 16, n0 = (job / rtiles) * 64;
      WarpTile<8> tile;
      tile.zero();
      tile.mma(
          Ep, [&](int m, int k) { return sRv[(m0 + m) * lde + k]; },
          [&](int k, int n) { return n0 + n < D ? sS[(n0 + n) * lde + k] : 0.f; });
      tile.each([&](int m, int n, float& v) {
        if (n0 + n < D) dR[(size_t)(m0 + m) * WD + E + n0 + n] = -v;
      });
    }
  });
  ex.done();
}

}  // namespace cuda
}  // namespace lasp
