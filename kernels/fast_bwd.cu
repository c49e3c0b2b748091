// Tensor-core backward (bf16/fp16, fp32 accumulate) for D, E multiples of 8 up to 128 (compiled for
// {64, 128} and padded at run time as in fast_fwd.cu: zero-filled loads, masked stores): one block of 8
// warps per (b, h, segment) computes dq, dk, dv of its segment (and grad_state_in with one segment),
// chunks of 64.
//
//  loop A, chunks forward, state S (fp32 registers; S_b its 16-bit copy in smem):
//     dq = diag(scale g^(t+1)) dO S_b^T + ((scale dO V^T) * causal decay mask) K
//     S  = g^len S + (K^T diag(g^(len-1-s))) V
//  loop B, chunks backward, state R (gradient w.r.t. the state at the chunk's end):
//     dk = diag(g^(len-1-s)) V R_b^T + ((scale V dO^T) * anti-causal mask) Q
//     dv = diag(g^(len-1-s)) K R_b   + ((scale K Q^T) * anti-causal mask) dO
//     R  = g^len R + scale Q^T diag(g^(t+1)) dO
// Warp w: rows 16*rg .. +15 of the chunk (rg = w%4, or 3 - w%4 for w >= 4), column half w/4 of dq / dk / dv.
// Reads: dO, V, K (loop A) and Q, K, V, dO (loop B); writes dq, dk, dv once.
// Where k or v heads (q heads) are shared, dk / dv (dq) of each output head go to a 16-bit workspace that the
// caller sums (fast_path.h, HeadWs).
// ACC (head dims above 128, split into blocks by the driver): dq, dk and dv of each query head are terms
// of sums over blocks, left as the driver's AccOuts say (fast_args.h: stored or added in fp32, or added
// and written as the 16-bit output).
#include <type_traits>

#include "common.cuh"
#include "dispatch.h"
#include "fast_args.h"
#include "fast_path.h"
#include "launch_cache.h"
#include "mma.cuh"
#include "mma_tiles.cuh"

namespace lasp {
namespace cuda {
namespace fast {

using namespace detail;
using namespace mma;

namespace {

constexpr int kC = 64;
constexpr int kThreadsB = 256;
// Blocks per SM the register budget is cut for: at D = E = 64 two 8-warp blocks fit (128 registers per
// thread, no spills; shared memory about 83 KB each), which hides the latency one block leaves exposed.
// Larger heads keep one block (up to 255 registers).
template <int D, int E>
constexpr int kBwdMinBlocks = (D == 64 && E == 64) ? 2 : 1;

template <typename T, int D, int E>
struct BwdSmem {
  static constexpr int LDD = D + 8, LDE = E + 8;
  // stage: Q [64][LDD], K [64][LDD], V [64][LDE], dO [64][LDE]
  static constexpr int STAGE = 2 * kC * LDD + 2 * kC * LDE;
  static constexpr size_t bytes = (size_t)(2 * STAGE + D * LDE) * sizeof(T) + (kC + 2) * sizeof(float);
};

template <typename T, int D, int E, bool ACC = false>
__global__ void __launch_bounds__(kThreadsB, kBwdMinBlocks<D, E>) bwd_kernel(BwdArgs a, Tv<const T> q, Tv<const T> k, Tv<const T> v,
                                                           Tv<const T> dout, Tv<T> dq, Tv<T> dk, Tv<T> dv,
                                                           AccOuts accs) {
  using SM = BwdSmem<T, D, E>;
  constexpr int LDD = SM::LDD, LDE = SM::LDE;
  // state fragments owned by a warp
  constexpr bool SPLIT_E = D < 128;            // D = 64: 4 m-tiles, split E between warp halves
  constexpr int SNT = SPLIT_E ? E / 16 : E / 8; // n-tiles of the state per warp
  constexpr int DH = D / 2, EH = E / 2;         // column halves of dq/dk and dv
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stage0 = reinterpret_cast<T*>(smem_raw);
  T* Sb = stage0 + 2 * SM::STAGE;  // [D][LDE]
  float* Gp = reinterpret_cast<float*>(Sb + D * LDE);

  const int seg = blockIdx.x % a.nseg, bh = blockIdx.x / a.nseg;
  const int b = bh / a.H, h = bh % a.H, qh = h / a.qgroup, kh = h / a.group, vh = h / a.vgroup;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  // Warps w and w+4 share a sub-partition (tensor cores): give them row groups k and 3-k, so that the
  // causal (loop A) and anti-causal (loop B) work of each sub-partition is the same.
  const int ch = warp >> 2, rg = ch ? 3 - (warp & 3) : (warp & 3);
  const int r0 = rg * 16;
  const int sm0 = SPLIT_E ? (warp & 3) * 16 : warp * 16;  // state rows of this warp
  const int sn0 = SPLIT_E ? (warp >> 2) * (E / 2) : 0;    // state cols of this warp
  const float lg = log_gamma(a.decay, h);
  const float scale = a.scale;
  for (int i = threadIdx.x; i <= kC; i += blockDim.x) Gp[i] = expf(lg * (float)i);

  const int64_t n0 = (int64_t)seg * a.seglen;
  const int64_t n1 = min((int64_t)a.N, n0 + a.seglen);
  const int nch = (int)((n1 - n0 + kC - 1) / kC);
  const size_t DE = (size_t)a.D * a.E;

  float S[SNT][4];
  auto load_state = [&](const float* src) {
#pragma unroll
    for (int nt = 0; nt < SNT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int d = sm0 + g + (r >> 1) * 8, e = sn0 + nt * 8 + 2 * tc + (r & 1);
        S[nt][r] = src && d < a.D && e < a.E ? src[(size_t)d * a.E + e] : 0.f;
      }
  };
  auto write_sb = [&]() {
#pragma unroll
    for (int nt = 0; nt < SNT; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int d = sm0 + g + hh * 8, e = sn0 + nt * 8 + 2 * tc;
        *reinterpret_cast<uint32_t*>(Sb + d * LDE + e) = pack2<T>(S[nt][2 * hh], S[nt][2 * hh + 1]);
      }
  };
  auto stage_ptr = [&](int i) { return stage0 + (i & 1) * SM::STAGE; };
  // stage layout
  auto Qp = [&](T* st) { return st; };
  auto Kp = [&](T* st) { return st + kC * LDD; };
  auto Vp = [&](T* st) { return st + 2 * kC * LDD; };
  auto DOp = [&](T* st) { return st + 2 * kC * LDD + kC * LDE; };

  // ================= loop A: dq =================
  {
    const float* S0 = a.nseg > 1 ? a.seg_S + ((size_t)bh * a.nseg + seg) * DE
                                 : (a.state_in ? a.state_in + (size_t)bh * DE : nullptr);
    load_state(S0);
    write_sb();
  }
  auto issue_A = [&](int ci) {
    const int64_t c0 = n0 + (int64_t)ci * kC;
    const int len = (int)min((int64_t)kC, n1 - c0);
    T* st = stage_ptr(ci);
    load_rows<T, D, LDD>(Kp(st), k, b, kh, c0, len, 0, a.D);
    load_rows<T, E, LDE>(Vp(st), v, b, vh, c0, len, 0, a.E);
    load_rows<T, E, LDE>(DOp(st), dout, b, h, c0, len, 0, a.E);
    cp_async_commit();
  };
  issue_A(0);
  for (int ci = 0; ci < nch; ++ci) {
    const int64_t c0 = n0 + (int64_t)ci * kC;
    const int len = (int)min((int64_t)kC, n1 - c0);
    T* st = stage_ptr(ci);
    const T* Ks = Kp(st);
    const T* Vs = Vp(st);
    const T* DOs = DOp(st);
    cp_async_wait<0>();
    __syncthreads();
    if (ci + 1 < nch) issue_A(ci + 1);
    {
      uint32_t oa[E / 16][4];
#pragma unroll
      for (int kk = 0; kk < E / 16; ++kk) load_a(oa[kk], DOs, LDE, r0, kk * 16);
      // acc = dO S^T (cols of this warp's half of D)
      float acc[DH / 8][4];
#pragma unroll
      for (int nt = 0; nt < DH / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][r] = 0.f;
#pragma unroll
      for (int kk = 0; kk < E / 16; ++kk)
#pragma unroll
        for (int np = 0; np < DH / 16; ++np) {
          uint32_t bb[4];
          load_b_nk(bb, Sb, LDE, kk * 16, ch * DH + np * 16);
          mma16816<T>(acc[2 * np], oa[kk], bb[0], bb[1]);
          mma16816<T>(acc[2 * np + 1], oa[kk], bb[2], bb[3]);
        }
      {
        const float f0 = scale * Gp[r0 + g + 1], f1 = scale * Gp[r0 + g + 9];
#pragma unroll
        for (int nt = 0; nt < DH / 8; ++nt) {
          acc[nt][0] *= f0;
          acc[nt][1] *= f0;
          acc[nt][2] *= f1;
          acc[nt][3] *= f1;
        }
      }
      // P = scale dO V^T, causal
      float P[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) P[nt][r] = 0.f;
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (np > rg) continue;
#pragma unroll
        for (int kk = 0; kk < E / 16; ++kk) {
          uint32_t bb[4];
          load_b_nk(bb, Vs, LDE, kk * 16, np * 16);
          mma16816<T>(P[2 * np], oa[kk], bb[0], bb[1]);
          mma16816<T>(P[2 * np + 1], oa[kk], bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int t = r0 + g + (r >> 1) * 8, s = nt * 8 + 2 * tc + (r & 1);
          P[nt][r] = s <= t ? P[nt][r] * scale * Gp[t - s] : 0.f;
        }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if (kk > rg) continue;
        uint32_t pa[4];
        pa[0] = pack2<T>(P[2 * kk][0], P[2 * kk][1]);
        pa[1] = pack2<T>(P[2 * kk][2], P[2 * kk][3]);
        pa[2] = pack2<T>(P[2 * kk + 1][0], P[2 * kk + 1][1]);
        pa[3] = pack2<T>(P[2 * kk + 1][2], P[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < DH / 16; ++np) {
          uint32_t bb[4];
          load_b_kn(bb, Ks, LDD, kk * 16, ch * DH + np * 16);
          mma16816<T>(acc[2 * np], pa, bb[0], bb[1]);
          mma16816<T>(acc[2 * np + 1], pa, bb[2], bb[3]);
        }
      }
      if constexpr (ACC) {
        store_frag_acc<T, DH / 8>(acc, accs.x[0], b, h, c0, r0, ch * DH, len, a.D);
      } else {
        store_frag<T, DH / 8>(acc, dq.p + b * dq.sb + h * dq.sh + c0 * dq.sn, dq.sn, r0, ch * DH, len, a.D);
      }
    }
    if (ci + 1 < nch) {
      __syncthreads();  // all warps done reading S_b
      const float gl = Gp[len];
#pragma unroll
      for (int nt = 0; nt < SNT; ++nt)
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
          w[j] = s < len ? Gp[len - 1 - s] : 0.f;
        }
        uint32_t ka[4];
        load_a_t(ka, Ks, LDD, sm0, kk * 16);
        if (lg != 0.f) {  // without decay every weight is 1 (rows past len are zero-filled)
          ka[0] = scale2<T>(ka[0], w[0], w[1]);
          ka[1] = scale2<T>(ka[1], w[0], w[1]);
          ka[2] = scale2<T>(ka[2], w[2], w[3]);
          ka[3] = scale2<T>(ka[3], w[2], w[3]);
        }
#pragma unroll
        for (int np = 0; np < SNT / 2; ++np) {
          uint32_t bb[4];
          load_b_kn(bb, Vs, LDE, kk * 16, sn0 + np * 16);
          mma16816<T>(S[2 * np], ka, bb[0], bb[1]);
          mma16816<T>(S[2 * np + 1], ka, bb[2], bb[3]);
        }
      }
      write_sb();
    }
  }

  // ================= loop B: dk, dv =================
  cp_async_wait<0>();
  __syncthreads();  // loop A done with every buffer
  {
    const float* G0 = a.nseg > 1 ? a.seg_G + ((size_t)bh * a.nseg + seg) * DE
                                 : (a.grad_state_out ? a.grad_state_out + (size_t)bh * DE : nullptr);
    load_state(G0);
    write_sb();
  }
  auto issue_B = [&](int ci) {  // ci counts chunks from the end
    const int cc = nch - 1 - ci;
    const int64_t c0 = n0 + (int64_t)cc * kC;
    const int len = (int)min((int64_t)kC, n1 - c0);
    T* st = stage_ptr(ci);
    load_rows<T, D, LDD>(Qp(st), q, b, qh, c0, len, 0, a.D);
    load_rows<T, D, LDD>(Kp(st), k, b, kh, c0, len, 0, a.D);
    load_rows<T, E, LDE>(Vp(st), v, b, vh, c0, len, 0, a.E);
    load_rows<T, E, LDE>(DOp(st), dout, b, h, c0, len, 0, a.E);
    cp_async_commit();
  };
  issue_B(0);
  // dk / dv: per output head into the workspace (shared k / v heads), else the k / v head
  const int hk = a.dk_per_head ? h : kh, hv = a.dv_per_head ? h : vh;
  for (int ci = 0; ci < nch; ++ci) {
    const int cc = nch - 1 - ci;
    const int64_t c0 = n0 + (int64_t)cc * kC;
    const int len = (int)min((int64_t)kC, n1 - c0);
    T* st = stage_ptr(ci);
    const T* Qs = Qp(st);
    const T* Ks = Kp(st);
    const T* Vs = Vp(st);
    const T* DOs = DOp(st);
    cp_async_wait<0>();
    __syncthreads();
    if (ci + 1 < nch) issue_B(ci + 1);
    const float ws0 = r0 + g < len ? Gp[len - 1 - (r0 + g)] : 0.f;
    const float ws1 = r0 + g + 8 < len ? Gp[len - 9 - (r0 + g)] : 0.f;
    // ---- dk = diag(w) V R^T + (scale V dO^T masked) Q ----
    {
      uint32_t va[E / 16][4];
#pragma unroll
      for (int kk = 0; kk < E / 16; ++kk) load_a(va[kk], Vs, LDE, r0, kk * 16);
      float acc[DH / 8][4];
#pragma unroll
      for (int nt = 0; nt < DH / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][r] = 0.f;
#pragma unroll
      for (int kk = 0; kk < E / 16; ++kk)
#pragma unroll
        for (int np = 0; np < DH / 16; ++np) {
          uint32_t bb[4];
          load_b_nk(bb, Sb, LDE, kk * 16, ch * DH + np * 16);
          mma16816<T>(acc[2 * np], va[kk], bb[0], bb[1]);
          mma16816<T>(acc[2 * np + 1], va[kk], bb[2], bb[3]);
        }
#pragma unroll
      for (int nt = 0; nt < DH / 8; ++nt) {
        acc[nt][0] *= ws0;
        acc[nt][1] *= ws0;
        acc[nt][2] *= ws1;
        acc[nt][3] *= ws1;
      }
      float P[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) P[nt][r] = 0.f;
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (np < rg) continue;
#pragma unroll
        for (int kk = 0; kk < E / 16; ++kk) {
          uint32_t bb[4];
          load_b_nk(bb, DOs, LDE, kk * 16, np * 16);
          mma16816<T>(P[2 * np], va[kk], bb[0], bb[1]);
          mma16816<T>(P[2 * np + 1], va[kk], bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int s = r0 + g + (r >> 1) * 8, t = nt * 8 + 2 * tc + (r & 1);
          P[nt][r] = t >= s ? P[nt][r] * scale * Gp[t - s] : 0.f;
        }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if (kk < rg) continue;
        uint32_t pa[4];
        pa[0] = pack2<T>(P[2 * kk][0], P[2 * kk][1]);
        pa[1] = pack2<T>(P[2 * kk][2], P[2 * kk][3]);
        pa[2] = pack2<T>(P[2 * kk + 1][0], P[2 * kk + 1][1]);
        pa[3] = pack2<T>(P[2 * kk + 1][2], P[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < DH / 16; ++np) {
          uint32_t bb[4];
          load_b_kn(bb, Qs, LDD, kk * 16, ch * DH + np * 16);
          mma16816<T>(acc[2 * np], pa, bb[0], bb[1]);
          mma16816<T>(acc[2 * np + 1], pa, bb[2], bb[3]);
        }
      }
      if constexpr (ACC) {  // per query head (the driver finishes in the kernel only without GQA)
        store_frag_acc<T, DH / 8>(acc, accs.x[1], b, h, c0, r0, ch * DH, len, a.D);
      } else {
        store_frag<T, DH / 8>(acc, dk.p + b * dk.sb + hk * dk.sh + c0 * dk.sn, dk.sn, r0, ch * DH, len, a.D);
      }
    }
    // ---- dv = diag(w) K R + (scale K Q^T masked) dO ----
    {
      uint32_t ka[D / 16][4];
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a(ka[kk], Ks, LDD, r0, kk * 16);
      float acc[EH / 8][4];
#pragma unroll
      for (int nt = 0; nt < EH / 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nt][r] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int np = 0; np < EH / 16; ++np) {
          uint32_t bb[4];
          load_b_kn(bb, Sb, LDE, kk * 16, ch * EH + np * 16);
          mma16816<T>(acc[2 * np], ka[kk], bb[0], bb[1]);
          mma16816<T>(acc[2 * np + 1], ka[kk], bb[2], bb[3]);
        }
#pragma unroll
      for (int nt = 0; nt < EH / 8; ++nt) {
        acc[nt][0] *= ws0;
        acc[nt][1] *= ws0;
        acc[nt][2] *= ws1;
        acc[nt][3] *= ws1;
      }
      float P[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) P[nt][r] = 0.f;
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (np < rg) continue;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t bb[4];
          load_b_nk(bb, Qs, LDD, kk * 16, np * 16);
          mma16816<T>(P[2 * np], ka[kk], bb[0], bb[1]);
          mma16816<T>(P[2 * np + 1], ka[kk], bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int s = r0 + g + (r >> 1) * 8, t = nt * 8 + 2 * tc + (r & 1);
          P[nt][r] = t >= s ? P[nt][r] * scale * Gp[t - s] : 0.f;
        }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if (kk < rg) continue;
        uint32_t pa[4];
        pa[0] = pack2<T>(P[2 * kk][0], P[2 * kk][1]);
        pa[1] = pack2<T>(P[2 * kk][2], P[2 * kk][3]);
        pa[2] = pack2<T>(P[2 * kk + 1][0], P[2 * kk + 1][1]);
        pa[3] = pack2<T>(P[2 * kk + 1][2], P[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < EH / 16; ++np) {
          uint32_t bb[4];
          load_b_kn(bb, DOs, LDE, kk * 16, ch * EH + np * 16);
          mma16816<T>(acc[2 * np], pa, bb[0], bb[1]);
          mma16816<T>(acc[2 * np + 1], pa, bb[2], bb[3]);
        }
      }
      if constexpr (ACC) {
        store_frag_acc<T, EH / 8>(acc, accs.x[2], b, h, c0, r0, ch * EH, len, a.E);
      } else {
        store_frag<T, EH / 8>(acc, dv.p + b * dv.sb + hv * dv.sh + c0 * dv.sn, dv.sn, r0, ch * EH, len, a.E);
      }
    }
    __syncthreads();  // all warps done reading R_b
    // ---- R = g^len R + scale Q^T diag(g^(t+1)) dO ----
    {
      const float gl = Gp[len];
#pragma unroll
      for (int nt = 0; nt < SNT; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) S[nt][r] *= gl;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if (kk * 16 >= len) continue;
        const int t0 = kk * 16 + 2 * tc;
        float w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int t = t0 + (j & 1) + (j >> 1) * 8;
          w[j] = t < len ? scale * Gp[t + 1] : 0.f;
        }
        uint32_t qa[4];
        load_a_t(qa, Qs, LDD, sm0, kk * 16);
        qa[0] = scale2<T>(qa[0], w[0], w[1]);
        qa[1] = scale2<T>(qa[1], w[0], w[1]);
        qa[2] = scale2<T>(qa[2], w[2], w[3]);
        qa[3] = scale2<T>(qa[3], w[2], w[3]);
#pragma unroll
        for (int np = 0; np < SNT / 2; ++np) {
          uint32_t bb[4];
          load_b_kn(bb, DOs, LDE, kk * 16, sn0 + np * 16);
          mma16816<T>(S[2 * np], qa, bb[0], bb[1]);
          mma16816<T>(S[2 * np + 1], qa, bb[2], bb[3]);
        }
      }
      if (ci + 1 < nch) write_sb();
    }
  }
  if (a.grad_state_in && seg == 0) {  // the state gradient before the sequence's first chunk
#pragma unroll
    for (int nt = 0; nt < SNT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int d = sm0 + g + (r >> 1) * 8, e = sn0 + nt * 8 + 2 * tc + (r & 1);
        if (d < a.D && e < a.E) a.grad_state_in[(size_t)bh * DE + (size_t)d * a.E + e] = S[nt][r];
      }
  }
}

template <typename T, int D, int E, bool ACC = false>
cudaError_t launch_bwd(const AttnParams& p, const BwdArgs& a, Tv<T> dq, Tv<T> dk, Tv<T> dv, cudaStream_t st,
                       const AccOut* acc = nullptr) {
  auto kern = bwd_kernel<T, D, E, ACC>;
  const size_t smem = BwdSmem<T, D, E>::bytes;
  cudaError_t e = opt_in_smem<bwd_kernel<T, D, E, ACC>>(smem);
  if (e != cudaSuccess) return e;
  const unsigned blocks = (unsigned)(p.B * p.H * a.nseg);
  AccOuts accs{};
  if (acc)
    for (int i = 0; i < 3; ++i) accs.x[i] = acc[i];
  kern<<<blocks, kThreadsB, smem, st>>>(a, make_tv<const T>(p.q), make_tv<const T>(p.k), make_tv<const T>(p.v),
                                        make_tv<const T>(p.dout), dq, dk, dv, accs);
  return cudaGetLastError();
}

template <typename T, int D, int E>
int bwd_resident() {
  // planning falls back to one block per SM where the runtime cannot say; the launch reports real errors
  return resident_blocks<bwd_kernel<T, D, E>>(kThreadsB, BwdSmem<T, D, E>::bytes, 1);
}

template <typename T>
int bwd_resident_dims(const AttnParams& p) {
  return with_dims(p, [](auto d, auto e) { return bwd_resident<T, decltype(d)::value, decltype(e)::value>(); });
}

template <typename T, bool ACC = false>
cudaError_t launch_bwd_dims(const AttnParams& p, const BwdArgs& a, Tv<T> dq, Tv<T> dk, Tv<T> dv, cudaStream_t st,
                            const AccOut* acc = nullptr) {
  return with_dims(p, [&](auto d, auto e) {
    return launch_bwd<T, decltype(d)::value, decltype(e)::value, ACC>(p, a, dq, dk, dv, st, acc);
  });
}

}  // namespace

bool bwd_supported(const AttnParams& p) {
  if (!shape_supported(p)) return false;
  // dq, dk, dv that go through the per-output-head workspace are not read as views
  const int64_t Hq = q_heads(p), Hv = v_heads(p);
  return view_ok(p.q, p, Hq) && view_ok(p.k, p, p.Hkv) && view_ok(p.v, p, Hv) && view_ok(p.dout, p, p.H) &&
         (Hq != p.H || view_ok(p.dq, p, Hq)) && (p.Hkv != p.H || view_ok(p.dk, p, p.Hkv)) &&
         (Hv != p.H || view_ok(p.dv, p, Hv));
}

int mma_bwd_blocks_per_sm(const AttnParams& p) {
  return with_type(p, [&](auto t) {
    using T = typename decltype(t)::type;
    return bwd_resident_dims<T>(p);
  });
}

size_t mma_bwd_smem_bytes(const AttnParams& p) {
  return with_dims(p, [](auto d, auto e) { return BwdSmem<__nv_bfloat16, decltype(d)::value, decltype(e)::value>::bytes; });
}

cudaError_t mma_bwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_S, const float* seg_G,
                         const HeadWs& ws, cudaStream_t st, const AccOut* acc) {
  return with_type(p, [&](auto t) {
    using T = typename decltype(t)::type;
    if (acc)  // head-dim blocks: dq, dk, dv as acc[0..2] say, per output head
      return launch_bwd_dims<T, true>(p, make_bwd_args(p, nseg, seglen, seg_S, seg_G, true, true), {}, {}, {}, st,
                                      acc);
    const BwdArgs a = make_bwd_args(p, nseg, seglen, seg_S, seg_G, ws.dk != nullptr, ws.dv != nullptr);
    // per output head into the workspace where heads are shared (HeadWs), else the outputs
    return launch_bwd_dims<T>(p, a, ws.dq ? make_tv_contig<T>(ws.dq, p.H, p.N, p.D) : make_tv<T>(p.dq),
                              ws.dk ? make_tv_contig<T>(ws.dk, p.H, p.N, p.D) : make_tv<T>(p.dk),
                              ws.dv ? make_tv_contig<T>(ws.dv, p.H, p.N, p.E) : make_tv<T>(p.dv), st);
  });
}

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
