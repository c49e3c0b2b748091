// Tensor-core (mma.sync m16n8k16, bf16/fp16, fp32 accumulate) kernels for D and E multiples of 8 up to
// 128: the forward main loop and the per-segment local states (phase 1 of both directions). See
// fast_path.h and generic_kernels.cuh for the phase structure.
//
// Head dims are padded, not copied: a kernel is compiled for D in {64, 128} (and, where it holds all of
// E, E in {64, 128}) and takes the true a.D, a.E at run time. Loads zero-fill the columns past them, so
// the padded rows of k^T v and of the state stay zero and every product is the unpadded one; stores and
// state writes skip them.
//
// Forward main kernel, one block of 4 warps per (b, h, segment, 64-column tile of E), chunks of 64:
//   per chunk (double-buffered cp.async loads of q, k, v):
//     O  = diag(scale g^(t+1)) Q S_b  +  ((scale Q K^T) * decay mask) V     (warp w: 16 rows)
//     S  = g^len S + (K^T diag(g^(len-1-s))) V                              (warp w: rows of S, fp32 in registers)
//   S_b is the bf16/fp16 copy of S in shared memory that the next chunk multiplies with.
// Bytes: q, k, v read once per column tile (the sibling tiles of one (b, h, segment) run next to
// each other, so the second read mostly hits L2), o written once.
// ACC (head dims above 128, split into blocks by the driver): o is one term of a sum over the blocks of D,
// left as oacc says (fast_args.h, AccOut: stored or added in fp32, or added and written as o).

#include "common.cuh"
#include "dispatch.h"
#include "fast_args.h"
#include "fast_path.h"
#include "launch_cache.h"
#include "lasp_cuda.h"
#include "mma.cuh"
#include "mma_tiles.cuh"

namespace lasp {
namespace cuda {
namespace fast {

using namespace detail;
using namespace mma;

namespace {

constexpr int kC = 64;    // chunk
constexpr int kEt = 64;   // E columns per block
constexpr int kWarps = 4;

template <typename T, int D>
struct FwdSmem {
  static constexpr int LDQ = D + 8, LDV = kEt + 8;
  static constexpr int STAGE = 2 * kC * LDQ + kC * LDV;  // elements of one stage (q, k, v)
  static constexpr size_t bytes = (2 * STAGE + D * LDV) * sizeof(T) + (kC + 2) * sizeof(float);
};

template <typename T, int D, bool ACC>
__global__ void __launch_bounds__(kWarps * 32) fwd_main_kernel(FwdArgs a, Tv<const T> q, Tv<const T> k, Tv<const T> v,
                                                                Tv<T> o, AccOut oacc) {
  using SM = FwdSmem<T, D>;
  constexpr int LDQ = SM::LDQ, LDV = SM::LDV;
  constexpr int MT = D / 4 / 16;  // m-tiles of S per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stage0 = reinterpret_cast<T*>(smem_raw);
  T* Sb = stage0 + 2 * SM::STAGE;
  float* Gp = reinterpret_cast<float*>(Sb + D * LDV);

  const int ntile = (a.E + kEt - 1) / kEt;
  const int et = blockIdx.x % ntile;
  const int rest = blockIdx.x / ntile;
  const int seg = rest % a.nseg, bh = rest / a.nseg;
  const int b = bh / a.H, h = bh % a.H, qh = h / a.qgroup, kh = h / a.group, vh = h / a.vgroup;
  const int e0 = et * kEt;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  const float lg = log_gamma(a.decay, h);
  for (int i = threadIdx.x; i <= kC; i += blockDim.x) Gp[i] = expf(lg * (float)i);

  const int64_t n0 = (int64_t)seg * a.seglen;
  const int64_t n1 = min((int64_t)a.N, n0 + a.seglen);
  const int nch = (int)((n1 - n0 + kC - 1) / kC);

  // prefetch chunk 0
  {
    const int len = (int)min((int64_t)kC, n1 - n0);
    T* st = stage0;
    load_rows<T, D, LDQ>(st, q, b, qh, n0, len, 0, a.D);
    load_rows<T, D, LDQ>(st + kC * LDQ, k, b, kh, n0, len, 0, a.D);
    load_rows<T, kEt, LDV>(st + 2 * kC * LDQ, v, b, vh, n0, len, e0, a.E);
    cp_async_commit();
  }

  // state rows owned by this warp: d = warp*(D/4) + mt*16 + {g, g+8}; cols e = nt*8 + 2tc + {0,1}
  float S[MT][8][4];
  {
    const float* S0 = a.nseg > 1 ? a.seg_states + ((size_t)bh * a.nseg + seg) * a.D * a.E
                                 : (a.state_in ? a.state_in + (size_t)bh * a.D * a.E : nullptr);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int d = warp * (D / 4) + mt * 16 + g + (r >> 1) * 8, e = nt * 8 + 2 * tc + (r & 1);
          S[mt][nt][r] = S0 && d < a.D && e0 + e < a.E ? S0[(size_t)d * a.E + e0 + e] : 0.f;
        }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int d = warp * (D / 4) + mt * 16 + g + hh * 8, e = nt * 8 + 2 * tc;
          *reinterpret_cast<uint32_t*>(Sb + d * LDV + e) = pack2<T>(S[mt][nt][2 * hh], S[mt][nt][2 * hh + 1]);
        }
  }

  // Row group of this warp: causal work grows with it. Odd blocks take the groups in reverse order, so that
  // two co-resident blocks (consecutive indices) give each sub-partition's tensor cores the same work.
  const int rgrp = (blockIdx.x & 1) ? 3 - warp : warp;
  const int r0 = rgrp * 16;
  for (int ci = 0; ci < nch; ++ci) {
    const int64_t c0 = n0 + (int64_t)ci * kC;
    const int len = (int)min((int64_t)kC, n1 - c0);
    T* st = stage0 + (ci & 1) * SM::STAGE;
    T* Qs = st;
    T* Ks = st + kC * LDQ;
    T* Vs = st + 2 * kC * LDQ;
    cp_async_wait<0>();
    __syncthreads();
    if (ci + 1 < nch) {
      const int64_t c1 = c0 + kC;
      const int len1 = (int)min((int64_t)kC, n1 - c1);
      T* sn = stage0 + ((ci + 1) & 1) * SM::STAGE;
      load_rows<T, D, LDQ>(sn, q, b, qh, c1, len1, 0, a.D);
      load_rows<T, D, LDQ>(sn + kC * LDQ, k, b, kh, c1, len1, 0, a.D);
      load_rows<T, kEt, LDV>(sn + 2 * kC * LDQ, v, b, vh, c1, len1, e0, a.E);
      cp_async_commit();
    }

    // ---- O = diag(scale g^(t+1)) Q S_b ----
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a(qa[kk], Qs, LDQ, r0, kk * 16);
    float O[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) O[nt][r] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        load_b_kn(bb, Sb, LDV, kk * 16, np * 16);
        mma16816<T>(O[2 * np], qa[kk], bb[0], bb[1]);
        mma16816<T>(O[2 * np + 1], qa[kk], bb[2], bb[3]);
      }
    {
      const float f0 = a.scale * Gp[r0 + g + 1], f1 = a.scale * Gp[r0 + g + 9];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        O[nt][0] *= f0;
        O[nt][1] *= f0;
        O[nt][2] *= f1;
        O[nt][3] *= f1;
      }
    }
    // ---- P = (scale Q K^T) * mask, causal: s-tiles 0 .. 2*rgrp+1 ----
    float P[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) P[nt][r] = 0.f;
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      if (np > rgrp) continue;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t bb[4];
        load_b_nk(bb, Ks, LDQ, kk * 16, np * 16);
        mma16816<T>(P[2 * np], qa[kk], bb[0], bb[1]);
        mma16816<T>(P[2 * np + 1], qa[kk], bb[2], bb[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int t = r0 + g + (r >> 1) * 8, s = nt * 8 + 2 * tc + (r & 1);
        P[nt][r] = s <= t ? P[nt][r] * a.scale * Gp[t - s] : 0.f;
      }
    // ---- O += P V ----
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (kk > rgrp) continue;
      uint32_t pa[4];
      pa[0] = pack2<T>(P[2 * kk][0], P[2 * kk][1]);
      pa[1] = pack2<T>(P[2 * kk][2], P[2 * kk][3]);
      pa[2] = pack2<T>(P[2 * kk + 1][0], P[2 * kk + 1][1]);
      pa[3] = pack2<T>(P[2 * kk + 1][2], P[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bb[4];
        load_b_kn(bb, Vs, LDV, kk * 16, np * 16);
        mma16816<T>(O[2 * np], pa, bb[0], bb[1]);
        mma16816<T>(O[2 * np + 1], pa, bb[2], bb[3]);
      }
    }
    if constexpr (ACC) {  // ---- o summed over the blocks of D (oacc.mode; each element owned by one thread) ----
      store_frag_acc<T, 8>(O, oacc, b, h, c0, r0, e0, len, a.E);
      __syncthreads();  // every warp is done reading S_b
    } else {
    // ---- store O: through this warp's own q rows in smem, then 16-byte vectors ----
    __syncwarp();
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      *reinterpret_cast<uint32_t*>(Qs + (r0 + g) * LDQ + nt * 8 + 2 * tc) = pack2<T>(O[nt][0], O[nt][1]);
      *reinterpret_cast<uint32_t*>(Qs + (r0 + g + 8) * LDQ + nt * 8 + 2 * tc) = pack2<T>(O[nt][2], O[nt][3]);
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = lane + 32 * i, rr = idx >> 3, cv = idx & 7;
      const int t = r0 + rr;
      if (t < len && e0 + cv * 8 < a.E) {
        T* dst = o.p + b * o.sb + h * o.sh + (c0 + t) * o.sn + e0 + cv * 8;
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(Qs + t * LDQ + cv * 8);
      }
    }
    __syncthreads();  // every warp is done reading S_b
    }
    // ---- S = g^len S + (K^T diag(w)) V,  w[s] = g^(len-1-s) ----
    {
      const float gl = Gp[len];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int r = 0; r < 4; ++r) S[mt][nt][r] *= gl;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if (kk * 16 >= len) continue;
        const int s0 = kk * 16 + 2 * tc;
        const float w0 = s0 < len ? Gp[len - 1 - s0] : 0.f, w1 = s0 + 1 < len ? Gp[len - 2 - s0] : 0.f;
        const float w2 = s0 + 8 < len ? Gp[len - 9 - s0] : 0.f, w3 = s0 + 9 < len ? Gp[len - 10 - s0] : 0.f;
        uint32_t bv[4][4];
#pragma unroll
        for (int np = 0; np < 4; ++np) load_b_kn(bv[np], Vs, LDV, kk * 16, np * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t ka[4];
          load_a_t(ka, Ks, LDQ, warp * (D / 4) + mt * 16, kk * 16);
          if (lg != 0.f) {  // without decay every weight is 1 (rows past len are zero-filled)
            ka[0] = scale2<T>(ka[0], w0, w1);
            ka[1] = scale2<T>(ka[1], w0, w1);
            ka[2] = scale2<T>(ka[2], w2, w3);
            ka[3] = scale2<T>(ka[3], w2, w3);
          }
#pragma unroll
          for (int np = 0; np < 4; ++np) {
            mma16816<T>(S[mt][2 * np], ka, bv[np][0], bv[np][1]);
            mma16816<T>(S[mt][2 * np + 1], ka, bv[np][2], bv[np][3]);
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int d = warp * (D / 4) + mt * 16 + g + hh * 8, e = nt * 8 + 2 * tc;
            *reinterpret_cast<uint32_t*>(Sb + d * LDV + e) = pack2<T>(S[mt][nt][2 * hh], S[mt][nt][2 * hh + 1]);
          }
    }
  }
  if (a.state_out && seg == a.nseg - 1) {  // the state after the sequence's last chunk
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int d = warp * (D / 4) + mt * 16 + g + (r >> 1) * 8, e = nt * 8 + 2 * tc + (r & 1);
          if (d < a.D && e0 + e < a.E) a.state_out[(size_t)bh * a.D * a.E + (size_t)d * a.E + e0 + e] = S[mt][nt][r];
        }
  }
}

// Local state of a segment (phase 1), all E columns in one block of D / 16 warps (warp w: rows
// 16w .. 16w+15 of the D x E state), so x is read once whatever E is:
//   REVERSE = false: L = sum_s g^(end-1-s) k[s]^T v[s]           (x = k, y = v, kv head), chunks forward
//   REVERSE = true:  M = scale sum_t g^(t-start+1) q[t]^T do[t]   (x = q, y = do), chunks backward
template <int D>
constexpr int kLocalThreads = D / 16 * 32;

template <typename T, int D, int E, bool REVERSE>
__global__ void __launch_bounds__(kLocalThreads<D>, D == 128 ? 2 : 1) state_local_kernel(FwdArgs a, Tv<const T> x,
                                                                                          Tv<const T> y) {
  constexpr int LDX = D + 8, LDY = E + 8;
  constexpr int STAGE = kC * LDX + kC * LDY;
  constexpr int NP = E / 16;  // pairs of 8-column n-tiles
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stage0 = reinterpret_cast<T*>(smem_raw);
  float* Gp = reinterpret_cast<float*>(stage0 + 2 * STAGE);
  const int seg = a.loc_first + (int)(blockIdx.x % a.loc_count), bh = (int)(blockIdx.x / a.loc_count);
  // x: q (REVERSE) or k; y: dout (REVERSE, per output head) or v
  const int b = bh / a.H, h = bh % a.H, hx = h / (REVERSE ? a.qgroup : a.group), hy = REVERSE ? h : h / a.vgroup;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  const float lg = log_gamma(a.decay, h);
  for (int i = threadIdx.x; i <= kC; i += blockDim.x) Gp[i] = expf(lg * (float)i);
  const int64_t n0 = (int64_t)seg * a.seglen;
  const int64_t n1 = min((int64_t)a.N, n0 + a.seglen);
  const int nch = (int)((n1 - n0 + kC - 1) / kC);
  auto chunk_start = [&](int ci) { return n0 + (int64_t)(REVERSE ? nch - 1 - ci : ci) * kC; };
  {
    const int64_t c0 = chunk_start(0);
    const int len = (int)min((int64_t)kC, n1 - c0);
    load_rows<T, D, LDX>(stage0, x, b, hx, c0, len, 0, a.D);
    load_rows<T, E, LDY>(stage0 + kC * LDX, y, b, hy, c0, len, 0, a.E);
    cp_async_commit();
  }
  float S[2 * NP][4];
#pragma unroll
  for (int nt = 0; nt < 2 * NP; ++nt)
#pragma unroll
    for (int r = 0; r < 4; ++r) S[nt][r] = 0.f;
  for (int ci = 0; ci < nch; ++ci) {
    const int64_t c0 = chunk_start(ci);
    const int len = (int)min((int64_t)kC, n1 - c0);
    T* st = stage0 + (ci & 1) * STAGE;
    T* Xs = st;
    T* Ys = st + kC * LDX;
    cp_async_wait<0>();
    __syncthreads();
    if (ci + 1 < nch) {
      const int64_t c1 = chunk_start(ci + 1);
      const int len1 = (int)min((int64_t)kC, n1 - c1);
      T* sn = stage0 + ((ci + 1) & 1) * STAGE;
      load_rows<T, D, LDX>(sn, x, b, hx, c1, len1, 0, a.D);
      load_rows<T, E, LDY>(sn + kC * LDX, y, b, hy, c1, len1, 0, a.E);
      cp_async_commit();
    }
    const float gl = Gp[len];
#pragma unroll
    for (int nt = 0; nt < 2 * NP; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) S[nt][r] *= gl;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (kk * 16 >= len) continue;
      const int s0 = kk * 16 + 2 * tc;
      float w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int s = s0 + (j & 1) + (j >> 1) * 8;
        w[j] = s < len ? (REVERSE ? a.scale * Gp[s + 1] : Gp[len - 1 - s]) : 0.f;
      }
      // y's fragments of this k-step: all loaded up front for E = 64, one pair at a time for E = 128
      constexpr int NB = NP <= 4 ? NP : 1;
      uint32_t bv[NB][4];
      if constexpr (NB == NP) {
#pragma unroll
        for (int np = 0; np < NP; ++np) load_b_kn(bv[np], Ys, LDY, kk * 16, np * 16);
      }
      uint32_t xa[4];
      load_a_t(xa, Xs, LDX, warp * 16, kk * 16);
      if (REVERSE || lg != 0.f) {  // forward without decay: every weight is 1
        xa[0] = scale2<T>(xa[0], w[0], w[1]);
        xa[1] = scale2<T>(xa[1], w[0], w[1]);
        xa[2] = scale2<T>(xa[2], w[2], w[3]);
        xa[3] = scale2<T>(xa[3], w[2], w[3]);
      }
#pragma unroll
      for (int np = 0; np < NP; ++np) {
        const int ib = NB == NP ? np : 0;
        if constexpr (NB != NP) load_b_kn(bv[0], Ys, LDY, kk * 16, np * 16);
        mma16816<T>(S[2 * np], xa, bv[ib][0], bv[ib][1]);
        mma16816<T>(S[2 * np + 1], xa, bv[ib][2], bv[ib][3]);
      }
    }
  }
  float* out = a.local_out + ((size_t)bh * a.nseg + seg) * a.D * a.E;
#pragma unroll
  for (int nt = 0; nt < 2 * NP; ++nt)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int d = warp * 16 + g + (r >> 1) * 8, e = nt * 8 + 2 * tc + (r & 1);
      if (d < a.D && e < a.E) out[(size_t)d * a.E + e] = S[nt][r];
    }
}

template <typename T, int D, bool ACC>
cudaError_t launch_fwd_main(const AttnParams& p, const FwdArgs& a, const AccOut* oacc, cudaStream_t st) {
  auto kern = fwd_main_kernel<T, D, ACC>;
  const size_t smem = FwdSmem<T, D>::bytes;
  cudaError_t e = opt_in_smem<fwd_main_kernel<T, D, ACC>>(smem);
  if (e != cudaSuccess) return e;
  const unsigned blocks = (unsigned)(p.B * p.H * a.nseg * ((p.E + kEt - 1) / kEt));
  kern<<<blocks, kWarps * 32, smem, st>>>(a, make_tv<const T>(p.q), make_tv<const T>(p.k), make_tv<const T>(p.v),
                                          make_tv<T>(p.o), oacc ? *oacc : AccOut{});
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_fwd_main_acc(const AttnParams& p, const FwdArgs& a, const AccOut* oacc, cudaStream_t st) {
  return oacc ? launch_fwd_main<T, D, true>(p, a, oacc, st) : launch_fwd_main<T, D, false>(p, a, oacc, st);
}

template <typename T, int D, int E, bool REV>
cudaError_t launch_local(const AttnParams& p, const FwdArgs& a, const TensorView4& x, const TensorView4& y,
                         cudaStream_t st) {
  auto kern = state_local_kernel<T, D, E, REV>;
  const size_t smem = (size_t)2 * (kC * (D + 8) + kC * (E + 8)) * sizeof(T) + (kC + 2) * sizeof(float);
  cudaError_t e = opt_in_smem<state_local_kernel<T, D, E, REV>>(smem);
  if (e != cudaSuccess) return e;
  const unsigned blocks = (unsigned)(p.B * p.H * a.loc_count);
  kern<<<blocks, kLocalThreads<D>, smem, st>>>(a, make_tv<const T>(x), make_tv<const T>(y));
  return cudaGetLastError();
}

}  // namespace

bool view_ok(const TensorView4& t, const AttnParams& p, int64_t heads) {
  // last dim contiguous, rows 16-byte aligned (2-byte elements: strides multiples of 8); no zero stride
  // along a dim of more than one element (a broadcast view: the TMA maps of the wgmma kernels need
  // distinct rows), such views take the generic kernels
  const bool aligned = (reinterpret_cast<uintptr_t>(t.ptr) & 15) == 0;
  if (!t.ptr || !aligned || t.stride[3] != 1) return false;
  const int64_t sizes[3] = {p.B, heads, p.N};
  for (int i = 0; i < 3; ++i)
    if (t.stride[i] % 8 != 0 || (sizes[i] > 1 && t.stride[i] == 0)) return false;
  return true;
}

bool shape_supported(const AttnParams& p) {
  if (p.dtype != ScalarType::BFloat16 && p.dtype != ScalarType::Float16) return false;
  if (p.D < 8 || p.D > 128 || p.D % 8 != 0) return false;
  if (p.E < 8 || p.E > 128 || p.E % 8 != 0) return false;
  return p.N <= ((int64_t)1 << 30);
}

bool wgmma_shape(const AttnParams& p) {
  return shape_supported(p) && (p.D == 64 || p.D == 128) && (p.E == 64 || p.E == 128);
}

bool fwd_supported(const AttnParams& p) {
  return shape_supported(p) && view_ok(p.q, p, q_heads(p)) && view_ok(p.k, p, p.Hkv) && view_ok(p.v, p, v_heads(p)) &&
         view_ok(p.o, p, p.H);
}

bool local_supported(const AttnParams& p, bool reverse) {
  if (!shape_supported(p)) return false;
  return reverse ? (view_ok(p.q, p, q_heads(p)) && view_ok(p.dout, p, p.H))
                 : (view_ok(p.k, p, p.Hkv) && view_ok(p.v, p, v_heads(p)));
}

size_t mma_fwd_smem_bytes(const AttnParams& p) {
  return with_dim(p.D, [](auto d) { return FwdSmem<__nv_bfloat16, decltype(d)::value>::bytes; });
}

int fwd_tiles(const AttnParams& p) { return (int)((p.E + kEt - 1) / kEt); }

namespace {
template <typename T, int D>
int fwd_resident_blocks() {
  // planning falls back to two blocks per SM where the runtime cannot say; the launch reports real errors
  return resident_blocks<fwd_main_kernel<T, D, false>>(kWarps * 32, FwdSmem<T, D>::bytes, 2);
}
}  // namespace

int mma_fwd_blocks_per_sm(const AttnParams& p) {
  return with_type(p, [&](auto t) {
    return with_dim(p.D, [&](auto d) { return fwd_resident_blocks<typename decltype(t)::type, decltype(d)::value>(); });
  });
}

cudaError_t mma_fwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_states, cudaStream_t st,
                         const AccOut* o_acc) {
  FwdArgs a = make_fwd_args(p, nseg, seglen, seg_states);
  return with_type(p, [&](auto t) {
    return with_dim(p.D, [&](auto d) {
      return launch_fwd_main_acc<typename decltype(t)::type, decltype(d)::value>(p, a, o_acc, st);
    });
  });
}

cudaError_t mma_state_local(const AttnParams& p, bool reverse, int nseg, int seglen, int skip, float* out,
                            cudaStream_t st) {
  const FwdArgs a = make_local_args(p, reverse, nseg, seglen, skip, out);
  return with_type_dims(p, [&](auto t, auto d, auto e) {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(d)::value, E = decltype(e)::value;
    return reverse ? launch_local<T, D, E, true>(p, a, p.q, p.dout, st) : launch_local<T, D, E, false>(p, a, p.k, p.v, st);
  });
}

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
