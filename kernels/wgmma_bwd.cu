// Backward main kernel with Hopper warpgroup MMAs (wgmma, sm_90a), bf16/fp16, D, E in {64, 128}: the
// contract, grid and segment plan of bwd_kernel (fast_bwd.cu), chosen by the plan (plan.cu) where the device
// is compute capability 9.0 and lasp::cuda::bwd_kernel() asks for it. Building blocks: wgmma.cuh.
//
// One block of two warpgroups (256 threads) per (b, h, segment), chunks of 64, double-buffered TMA loads
// into 128B-swizzled shared memory (thread 0 issues them; an mbarrier per stage and loop says when they
// have landed), one block-wide barrier per chunk; 16-bit dq, dk, dv leave by TMA stores of each warp's
// 16 rows from swizzled staging atoms. The two warpgroups split the
// work by role, so each holds only its own accumulators:
//   loop A (chunks forward):
//     WG0: dq = diag(scale g^(t+1)) dO S_b^T + ((scale dO V^T) * causal decay mask) K
//     WG1: S  = g^len S + (K^T diag(g^(len-1-s))) V  -> the next chunk's S_b (double-buffered)
//   loop B (chunks backward), R = gradient w.r.t. the state at the chunk's end, R_b its 16-bit copy:
//     WG0: dk = diag(g^(len-1-s)) V R_b^T + ((scale V dO^T) * anti-causal mask) Q
//     WG1: dv = diag(g^(len-1-s)) K R_b   + ((scale K Q^T) * anti-causal mask) dO
//     R = g^len R + scale Q^T diag(g^(t+1)) dO: rows 64w .. of R in warpgroup w at D = 128, all of R in
//     WG0 at D = 64
// SS wgmmas read the tiles and S_b / R_b from shared memory; the masked products return as RS operands;
// the state updates are RS wgmmas with K^T / Q^T fragments from ldmatrix.trans, scaled by the decay
// weights in registers. Reads: dO, V, K (loop A) and Q, K, V, dO (loop B); writes dq, dk, dv once.
// Where k or v heads (q heads) are shared, dk / dv (dq) of each output head are added by TMA reduce-adds
// (fp32, in L2) into zeroed fp32 sums over the shared heads that the caller rounds into the gradients, or,
// for bitwise reproducible sums (AttnParams::deterministic), go by the usual TMA stores to a 16-bit
// per-output-head workspace that the caller sums (fast_path.h, HeadWs).
// GM = 1 (per-token gates, planned only without an outgoing-state gradient G): the powers of g become the
// chunk's gate weights (wgmma.cuh, ChunkView over a GateTile), which warp 0 scans into one of two tiles before
// each chunk's barrier; loop A also loads Q, and WG0's threads of each row leave q[t].dq_h[t] in dg (loop A) and take
// k[t].dk_h[t] from it (loop B), each without the pair (t, t) (its 16-bit P value, diag_rounded, times
// q[t].k[t]). The suffix sums of those terms over a whole row would add up their 16-bit rounding token by
// token; instead WG1 keeps the state after each chunk (chunk_S) and loop B adds <S, R> at each chunk's end
// (chunk_T: exactly the sum over every later token), so dg_chunk_finish_kernel sums within a chunk only.
// (With G, its terms would come through the 16-bit state copy R_b: the driver adds them itself, and the
// plan takes this kernel with gates only without G.)
// GM = 2 (document starts only, AttnParams::g_resets; no dg): the powers of g cut at the starts (ResetTile, a
// 64-bit mask of the chunk's starts made by warp 0 from the same loads), as in the forward; no Q in loop A.
// ACC (head dims above 128, cut into blocks by lasp_cuda.cu): dq, dk and dv of each query head are terms
// of sums over the blocks, left as the AccOuts say (fast_args.h) by direct stores from the registers.
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "dispatch.h"
#include "fast_args.h"
#include "fast_path.h"
#include "launch_cache.h"
#include "lasp_cuda.h"
#include "mma.cuh"
#include "mma_tiles.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace lasp {
namespace cuda {
namespace fast {

namespace {

using namespace detail;

constexpr int kC = 64;
constexpr int kThreads = 256;         // two warpgroups
constexpr uint32_t kAtom = wg::kTileAtom;

// Shared memory (bytes from a 1024-aligned base): two stages of Q, K (D / 64 atoms each), V, dO (E / 64
// atoms each); two state copies [d][e] (E / 64 atoms of D rows x 128 B); NSTG output staging atoms per
// warpgroup (swizzled 64 x 64 16-bit tiles, the sources of the TMA stores: two where they fit, so that a
// warp writes one while the store of the other is still reading it); the decay powers; two chunks' gates;
// the mbarriers of the two stages in loop A and in loop B.
template <int D, int E>
struct WgBwdSmem {
  static constexpr uint32_t Q = 0, K = (D / 64) * kAtom, V = 2 * (D / 64) * kAtom, DO = V + (E / 64) * kAtom;
  static constexpr uint32_t STAGE = DO + (E / 64) * kAtom;
  static constexpr uint32_t BYTES_A = K + 2 * (E / 64) * kAtom;  // loop A loads K, V, dO
  static constexpr uint32_t SBUF = D * E * 2;  // one 16-bit D x E state
  static constexpr uint32_t SB = 2 * STAGE;
  static constexpr uint32_t OST = SB + 2 * SBUF;
  static constexpr int NSTG = (D == 64 && E == 64) ? 1 : 2;  // D = E = 64: two blocks per SM must fit
  static constexpr uint32_t GP = OST + 2 * NSTG * kAtom;
  static constexpr uint32_t GT = GP + (kC + 2) * sizeof(float);  // two gate tiles (GM > 0: chunk ci in ci & 1)
  static constexpr uint32_t BAR = GT + 2 * sizeof(wg::GateTile);
  static constexpr size_t bytes = BAR + 4 * 8 + 1024;  // + alignment slack
  static_assert(Q == 0 && K % 1024 == 0 && V % 1024 == 0 && DO % 1024 == 0 && SB % 1024 == 0 && OST % 1024 == 0 &&
                    BAR % 8 == 0,
                "1024-byte atoms");
  static_assert(bytes <= 232448, "the opt-in shared memory of one sm_90 block");
};

#if LASP_WGMMA  // device helpers of the kernel below (its body is empty in other targets)
// The 16-bit state [d][e] at `buf` (E / 64 atoms of D rows x 128 B) as the K-major B operand of
// X S^T (N = the 64 rows d of block nb, K = e, k-step kk). D is the state's row count.
template <int D>
__device__ __forceinline__ uint64_t state_kmajor_d(uint32_t buf, int nb, int kk) {
  return wg::make_desc(buf + (uint32_t)(kk >> 2) * (D * 128) + (uint32_t)nb * 8192 + (uint32_t)(kk & 3) * 32, 16, 1024);
}

// All 256 threads (named barrier 1). The two warpgroups reach it from their own loops, i.e. from different
// instructions: the non-aligned form (bar.sync is barrier.sync.aligned, which requires every thread to
// execute the same instruction; compute-sanitizer synccheck reported that use as divergent).
__device__ __forceinline__ void block_sync() { asm volatile("barrier.sync 1, 256;\n" ::: "memory"); }


// st (64 rows of block mb of a D x E fp32 state) = g^len st + X^T diag(w) Y over the chunk (K = its 64 rows):
// X = the tile at xt (rows s, 64-column atoms), Y = the tile at yt, MN-major (NE atoms). w[s] = g^(len-1-s)
// (REV = false: the forward state, from K and V) or scale g^(s+1) (REV = true: R, from Q and dO), in general (the chunk's
// view) suf(s) or scale pre(s); rows past
// len get 0 (their tiles are zero-filled too). In three parts, so that a caller can make the X^T fragments
// (state_frags) while other wgmmas run, scale st (wg::scale_state) once none is in flight, and issue the
// wgmmas (state_issue) after the wg::fence() that opens their stage.
template <typename T, bool REV, int GM>
__device__ __forceinline__ void state_frags(uint32_t (&xa)[4][4], uint32_t xt, int mb, int r0, int len, bool weigh,
                                            float scale, const wg::ChunkView<GM>& view) {
  const int tc = threadIdx.x & 3;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    wg::load_a_t_sw128(xa[kk], xt, kAtom, 64 * mb + r0, kk * 16);
    if (weigh) {
      float w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int s = kk * 16 + 2 * tc + (j & 1) + (j >> 1) * 8;
        w[j] = s < len ? (REV ? scale * view.pre(s) : view.w(len - 1, s)) : 0.f;  // pre(s), suf(s)
      }
      xa[kk][0] = mma::scale2<T>(xa[kk][0], w[0], w[1]);
      xa[kk][1] = mma::scale2<T>(xa[kk][1], w[0], w[1]);
      xa[kk][2] = mma::scale2<T>(xa[kk][2], w[2], w[3]);
      xa[kk][3] = mma::scale2<T>(xa[kk][3], w[2], w[3]);
    }
  }
}

template <typename T, int NE>
__device__ __forceinline__ void state_issue(float (&st)[NE][32], const uint32_t (&xa)[4][4], uint32_t yt) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int nb = 0; nb < NE; ++nb)
      wg::mma_rs_n64<T, 1>(st[nb], xa[kk], wg::mnmajor(yt, kAtom, nb, kk), 1);
}

#endif

// MINB = kBwdMinBlocks<D, E> (below): at D = E = 64 registers are cut for two blocks per SM (128, 60 bytes
// of spills; 189-196 uncapped, one block), as the mma.sync backward does there; its 80 KB of shared memory
// allow two.
// The tensor maps of one launch: the inputs, and dq, dk, dv (over the outputs, or over the 16-bit per-output-head
// workspace where heads are shared; unset in accumulate mode, which stores from the registers).
struct BwdMaps {
  CUtensorMap q, k, v, dout, dq, dk, dv;
};

template <typename T, int D, int E, int MINB, bool ACC, int GM>
__global__ void __launch_bounds__(kThreads, MINB)
    wgmma_bwd_kernel(BwdArgs a, const __grid_constant__ BwdMaps tm, AccOuts accs) {
#if LASP_WGMMA
  using SM = WgBwdSmem<D, E>;
  constexpr int ND = D / 64, NE = E / 64;  // 64-column blocks of D and E
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = mma::smem_addr(smem_raw);
  const uint32_t pad = (1024u - (raw & 1023u)) & 1023u;
  unsigned char* sm = smem_raw + pad;
  const uint32_t base = raw + pad;
  float* Gp = reinterpret_cast<float*>(sm + SM::GP);
  // GM (wgmma.cuh, ChunkView): 1 gates (and dg), 2 document starts only (no dg)
  constexpr bool VIEW = GM != 0, DG = GM == 1;
  auto tile = [&](int i) { return static_cast<void*>(sm + SM::GT + (uint32_t)(i & 1) * sizeof(wg::GateTile)); };

  const int seg = blockIdx.x % a.nseg, bh = blockIdx.x / a.nseg;
  const int b = bh / a.H, h = bh % a.H, qh = h / a.qgroup, kh = h / a.group, vh = h / a.vgroup;
  // The warpgroup index through a warp shuffle, so the compiler knows it is warp-uniform: wgmma code in
  // branches on it would otherwise count as divergent and be serialized.
  const int wgi = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 7), 0);
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, tc = lane & 3;
  const int r0 = 16 * warp;  // this warp's rows of the chunk (and of a 64-row block of the state)
  const float lg = log_gamma(a.decay, h);
  const float scale = a.scale;
  for (int i = threadIdx.x; i <= kC; i += kThreads) Gp[i] = expf(lg * (float)i);

  const int n0 = seg * a.seglen;
  const int n1 = min(a.N, n0 + a.seglen);
  const int nch = (n1 - n0 + kC - 1) / kC;
  const size_t DE = (size_t)D * E;
  const uint32_t barA = base + SM::BAR, barB = barA + 16;  // + 8 (i & 1): stage i of loop A / B
  const uint32_t stg = SM::OST + (uint32_t)wgi * SM::NSTG * kAtom;  // this warpgroup's staging atoms
  int nstore = 0;  // this warp's TMA stores (tma::store_acc_rows)
  if (threadIdx.x == 0) {
    tma::prefetch_map(&tm.q);
    tma::prefetch_map(&tm.k);
    tma::prefetch_map(&tm.v);
    tma::prefetch_map(&tm.dout);
    tma::init_barriers(barA, 4);
  }
  __syncthreads();
  // GM > 0: warp 0 makes chunk ci's tile (tile(ci)) before the chunk's barrier (so a tile is
  // rewritten only after every reader of the chunk two back passed the barrier of the one between), from
  // log gates it loaded a chunk ahead (lane l: tokens 2l, 2l + 1 of the chunk; 0 past the segment's end), kept
  // as loaded with whether each lies before the end: their first use is the tile's build, so the loads stay
  // in flight through the chunk before it.
  const float* grow = VIEW ? a.g + (size_t)bh * a.N : nullptr;
  float gn0 = 0.f, gn1 = 0.f;
  bool gv0 = false, gv1 = false;
  auto load_gates = [&](int c0) {
    const int t = c0 + 2 * lane;
    gv0 = t < n1;
    gv1 = t + 1 < n1;
    if (gv0) gn0 = grow[t];
    if (gv1) gn1 = grow[t + 1];
  };
  auto gate_chunk = [&](int i, int next_c0) {  // chunk i's tile; next_c0 < 0: no next chunk
    if (threadIdx.x < 32) {
      wg::build_tile<GM>(tile(i), gv0 ? gn0 + lg : 0.f, gv1 ? gn1 + lg : 0.f);
      if (next_c0 >= 0) load_gates(next_c0);
    }
  };
  // dg rows of this thread (DG, WG0, tc == 0): loop A stores q[t].dq_h[t], loop B subtracts k[t].dk_h[t]
  float* dgrow = DG && a.dg ? a.dg + (size_t)bh * a.N : nullptr;
  // DG with chunk_S: loop A's WG1 keeps the state after each even chunk of the segment (16-bit, in its
  // registers' fragment order: 16-byte words (mb, nb, j4) of 128 threads each), loop B dots it with R at
  // the chunk's end (an odd chunk: the state before it, and its own term; see loop B) into
  // chunk_T, so that dg's sums reach across chunks through <S, R> and not through the per-token terms of
  // every later token (whose 16-bit rounding would add up along the row).
  const int nct = (a.N + kC - 1) / kC, gc0 = n0 / kC;  // chunks of the row; this segment's first
  constexpr size_t kChunkWords = (size_t)ND * NE * 4 * 128;  // 16-byte words per chunk state
  // this segment's kept states (chunks 0, 2, 4, .. before its last: chunk_state_slots, fast_args.h)
  const int seg_slots = chunk_state_slots(a.seglen);
  uint4* const crow = DG && dgrow && a.chunk_S ? reinterpret_cast<uint4*>(a.chunk_S) +
                                                     ((size_t)bh * a.nseg + seg) * seg_slots * kChunkWords
                                               : nullptr;
  auto stage = [&](int i) { return base + (uint32_t)(i & 1) * SM::STAGE; };
  auto sbuf = [&](int i) { return base + SM::SB + (uint32_t)(i & 1) * SM::SBUF; };
  auto state_kmajor = [&](uint32_t buf, int nb, int kk) { return state_kmajor_d<D>(buf, nb, kk); };

  // A 64 x E block (rows 64 mb ..) of a D x E fp32 state in registers: st[nb][32], columns 64 nb + 8j + 2tc.
  // State element (d, e) of this thread: d = 64 mb + r0 + g + 8 (r >> 1), e = 64 nb + 8j + 2tc + (r & 1).
  auto load_rows = [&](float (&st)[NE][32], const float* src, int mb) {
#pragma unroll
    for (int nb = 0; nb < NE; ++nb) wg::load_acc(st[nb], src, E, 64 * mb + r0, 64 * nb);
  };
  // ... and its 16-bit copy into the state buffer at `buf` ([d][e], E / 64 atoms of D rows x 128 B).
  auto write_rows = [&](const float (&st)[NE][32], uint32_t buf, int mb) {
    unsigned char* p = sm + (buf - base);
#pragma unroll
    for (int nb = 0; nb < NE; ++nb)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int d = 64 * mb + r0 + g + 8 * hh;
          *reinterpret_cast<uint32_t*>(p + nb * (D * 128) + wg::sw128_offset(d, j) + 4 * tc) =
              mma::pack2<T>(st[nb][4 * j + 2 * hh], st[nb][4 * j + 2 * hh + 1]);
        }
  };
  // ================= loop A: dq (WG0), forward states (WG1) =================
  // Each warpgroup runs its own loop (its own registers); both meet at one named barrier per chunk.
  // Thread 0 only: chunk ci's tiles into stage ci & 1, rows past N as zeros (loop A: K, V, dO; loop B,
  // chunk ci from the end: Q, K, V, dO).
  auto issue_A = [&](int ci) {
    const int c0 = n0 + ci * kC;
    const uint32_t st = stage(ci), bar = barA + 8u * (uint32_t)(ci & 1);
    tma::arrive_expect_tx(bar, SM::BYTES_A + (dgrow ? SM::K : 0u));  // dg: Q too (its bytes: K's offset)
    if (dgrow) tma::load_atoms(st + SM::Q, &tm.q, bar, ND, 0, c0, qh, b);
    tma::load_atoms(st + SM::K, &tm.k, bar, ND, 0, c0, kh, b);
    tma::load_atoms(st + SM::V, &tm.v, bar, NE, 0, c0, vh, b);
    tma::load_atoms(st + SM::DO, &tm.dout, bar, NE, 0, c0, h, b);
  };
  auto chunk_top = [&](int ci) {  // this chunk's tiles (and S_b) visible to every thread and to wgmma
    tma::wait(barA + 8u * (uint32_t)(ci & 1), (uint32_t)(ci >> 1) & 1u);
    wg::fence_async_smem();
    block_sync();
    if (threadIdx.x == 0 && ci + 1 < nch) issue_A(ci + 1);
  };
  if (threadIdx.x == 0 && nch > 0) issue_A(0);
  if (VIEW && threadIdx.x < 32 && nch > 0) load_gates(n0);
  if (wgi == 0) {
    for (int ci = 0; ci < nch; ++ci) {
      const int c0 = n0 + ci * kC;
      const int len = min(kC, n1 - c0);
      const uint32_t st = stage(ci);
      if constexpr (ACC) {  // the running sum of dq, read at the chunk's end
#pragma unroll
        for (int nb = 0; nb < ND; ++nb) mma::prefetch_frag_acc<8>(accs.x[0], b, h, c0, r0, 64 * nb, len);
      }
      if constexpr (VIEW) gate_chunk(ci, ci + 1 < nch ? c0 + kC : -1);
      chunk_top(ci);
      const auto view = wg::ChunkView<GM>::at(Gp, tile(ci));
      float acc[ND][32], P[32];
#pragma unroll
      for (int nb = 0; nb < ND; ++nb) wg::zero_acc(acc[nb]);
      wg::zero_acc(P);
      wg::fence();
      // P = dO V^T (first group: masked while the second runs), acc = dO S_b^T (B = S_b's rows d, K-major over e)
#pragma unroll
      for (int kk = 0; kk < E / 16; ++kk) wg::mma_ss_n64<T, 0, 0>(P, wg::kmajor(st + SM::DO, kk), wg::kmajor(st + SM::V, kk), 1);
      wg::commit();
#pragma unroll
      for (int kk = 0; kk < E / 16; ++kk) {
        const uint64_t da = wg::kmajor(st + SM::DO, kk);
#pragma unroll
        for (int nb = 0; nb < ND; ++nb) wg::mma_ss_n64<T, 0, 0>(acc[nb], da, state_kmajor(sbuf(ci), nb, kk), 1);
      }
      wg::commit();
      wg::wait<1>();
      wg::fence_regs(P);
      uint32_t pa[4][4];
      float pd0 = 0.f, pd1 = 0.f;  // DG: the diagonal of the masked P (dg leaves the pairs (t, t) out)
      view.template pack<T, true>(P, pa, r0, scale);
      if constexpr (DG) {
        if (dgrow) wg::diag_rounded<T>(P, r0, scale, pd0, pd1);
      }
      wg::wait<0>();
#pragma unroll
      for (int nb = 0; nb < ND; ++nb) wg::fence_regs(acc[nb]);
      {
        const float f0 = scale * view.pre(r0 + g), f1 = scale * view.pre(r0 + g + 8);
#pragma unroll
        for (int nb = 0; nb < ND; ++nb) wg::scale_rows(acc[nb], f0, f1);
      }
#pragma unroll
      for (int nb = 0; nb < ND; ++nb) wg::fence_regs(acc[nb]);
      wg::fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int nb = 0; nb < ND; ++nb) wg::mma_rs_n64<T, 1>(acc[nb], pa[kk], wg::mnmajor(st + SM::K, kAtom, nb, kk), 1);
      wg::commit();
      wg::wait<0>();
#pragma unroll
      for (int nb = 0; nb < ND; ++nb) wg::fence_regs(acc[nb]);
      if constexpr (DG) {
        if (dgrow) {  // q[t].dq_h[t] without the pair (t, t): its term in dq[t] is pd k[t]
          float d0, d1, x0, x1;
          wg::row_dots<T, ND>(acc, sm + (st - base) + SM::Q, r0, d0, d1);
          wg::row_dots_tiles<T, ND>(sm + (st - base) + SM::Q, sm + (st - base) + SM::K, r0, x0, x1);
          d0 -= pd0 * x0;
          d1 -= pd1 * x1;
          if (tc == 0 && r0 + g < len) dgrow[c0 + r0 + g] = d0;
          if (tc == 0 && r0 + g + 8 < len) dgrow[c0 + r0 + g + 8] = d1;
        }
      }
#pragma unroll
      for (int nb = 0; nb < ND; ++nb) {
        if constexpr (ACC) {
          mma::store_frag_acc<T, 8>(reinterpret_cast<const float(*)[4]>(acc[nb]), accs.x[0], b, h, c0, r0, 64 * nb,
                                    len, a.D);
        } else if (a.red & 1) {  // shared q heads: added into q head qh's fp32 sum
          tma::reduce_acc_rows_f32<SM::NSTG>(acc[nb], &tm.dq, sm, base, stg, nstore, r0, len, 64 * nb, c0 + r0, qh, b);
        } else {
          tma::store_acc_rows<T, SM::NSTG>(acc[nb], &tm.dq, sm, base, stg, nstore, r0, len, 64 * nb, c0 + r0, h, b);
        }
      }
    }
  } else {
    float S[ND][NE][32];  // the state, 64-row blocks mb of d
    {
      const float* S0 = a.nseg > 1 ? a.seg_S + ((size_t)bh * a.nseg + seg) * DE
                                   : (a.state_in ? a.state_in + (size_t)bh * DE : nullptr);
#pragma unroll
      for (int mb = 0; mb < ND; ++mb) {
        load_rows(S[mb], S0, mb);
        write_rows(S[mb], sbuf(0), mb);
      }
    }
    for (int ci = 0; ci < nch; ++ci) {
      const int len = min(kC, n1 - (n0 + ci * kC));
      const uint32_t st = stage(ci);
      chunk_top(ci);
      if (ci + 1 == nch) continue;  // the state after the last chunk is not needed
      const auto view = wg::ChunkView<GM>::at(Gp, tile(ci));
      const bool weigh = VIEW || lg != 0.f;  // without decay every weight is 1 (rows past len are zero-filled)
      uint32_t xa[ND][4][4];
#pragma unroll
      for (int mb = 0; mb < ND; ++mb) {
        state_frags<T, false>(xa[mb], st + SM::K, mb, r0, len, weigh, scale, view);
        wg::scale_state(S[mb], view.pre(len - 1));
      }
      wg::fence();
#pragma unroll
      for (int mb = 0; mb < ND; ++mb) state_issue<T, NE>(S[mb], xa[mb], st + SM::V);
      wg::commit();
      wg::wait<0>();
#pragma unroll
      for (int mb = 0; mb < ND; ++mb) {
#pragma unroll
        for (int nb = 0; nb < NE; ++nb) wg::fence_regs(S[mb][nb]);
        write_rows(S[mb], sbuf(ci + 1), mb);
      }
      if (DG && crow && !(ci & 1)) {  // the state after an even chunk ci, for loop B's <S, R>
        uint4* dst = crow + (size_t)(ci >> 1) * kChunkWords + (threadIdx.x & 127);
#pragma unroll
        for (int mb = 0; mb < ND; ++mb)
#pragma unroll
          for (int nb = 0; nb < NE; ++nb)
#pragma unroll
            for (int j4 = 0; j4 < 4; ++j4) {
              const float* s = &S[mb][nb][8 * j4];
              dst[((mb * NE + nb) * 4 + j4) * 128] =
                  make_uint4(mma::pack2<T>(s[0], s[1]), mma::pack2<T>(s[2], s[3]), mma::pack2<T>(s[4], s[5]),
                             mma::pack2<T>(s[6], s[7]));
            }
      }
    }
  }

  // ================= loop B: dk (WG0), dv (WG1), R (by 64-row blocks) =================
  // As in loop A, each warpgroup runs its own copy of the loop (role W a compile-time constant), so that
  // no wgmma sits in a branch on the warpgroup and no register of an open pipeline stage is written by
  // anything but its wgmmas; the two meet at the named barrier at the top of each chunk.
  block_sync();  // loop A is done with every buffer
  auto issue_B = [&](int ci) {  // ci counts chunks from the end
    const int c0 = n0 + (nch - 1 - ci) * kC;
    const uint32_t st = stage(ci), bar = barB + 8u * (uint32_t)(ci & 1);
    tma::arrive_expect_tx(bar, SM::STAGE);
    tma::load_atoms(st + SM::Q, &tm.q, bar, ND, 0, c0, qh, b);
    tma::load_atoms(st + SM::K, &tm.k, bar, ND, 0, c0, kh, b);
    tma::load_atoms(st + SM::V, &tm.v, bar, NE, 0, c0, vh, b);
    tma::load_atoms(st + SM::DO, &tm.dout, bar, NE, 0, c0, h, b);
  };
  if (threadIdx.x == 0 && nch > 0) issue_B(0);
  if (VIEW && threadIdx.x < 32 && nch > 0) load_gates(n0 + (nch - 1) * kC);
  // dk / dv: per output head into the workspace (shared k / v heads), else the k / v head
  const int hk = a.dk_per_head ? h : kh, hv = a.dv_per_head ? h : vh;
  // DG: a warp's terms of <S_c, R> added into chunk c's sum (chunk_T)
  auto add_chunk_T = [&](int c, float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (lane == 0 && x != 0.f) atomicAdd(a.chunk_T + (size_t)bh * nct + gc0 + c, x);
  };
  auto loop_B = [&](auto role) {
    constexpr int W = decltype(role)::value;
    // WG0: dk (N = D) from V (A), R_b^T, V dO^T, Q;  WG1: dv (N = E) from K (A), R_b, K Q^T, dO.
    constexpr int NOUT = W == 0 ? ND : NE;
    // The 64-row block of R this warpgroup owns (-1: none): D = 128: block W; D = 64: WG0 block 0.
    constexpr int RMB = D == 128 ? W : (W == 0 ? 0 : -1);
    float R[NE][32];
    if constexpr (RMB >= 0) {
      const float* G0 = a.nseg > 1 ? a.seg_G + ((size_t)bh * a.nseg + seg) * DE
                                   : (a.grad_state_out ? a.grad_state_out + (size_t)bh * DE : nullptr);
      load_rows(R, G0, RMB);
      write_rows(R, sbuf(0), RMB);
    }
    for (int ci = 0; ci < nch; ++ci) {
      const int c0 = n0 + (nch - 1 - ci) * kC;
      const int len = min(kC, n1 - c0);
      const uint32_t st = stage(ci);
      if constexpr (ACC) {  // the running sum of dk / dv, read at the chunk's end
#pragma unroll
        for (int nb = 0; nb < NOUT; ++nb) mma::prefetch_frag_acc<8>(accs.x[W == 0 ? 1 : 2], b, h, c0, r0, 64 * nb, len);
      }
      if constexpr (VIEW && W == 0) gate_chunk(ci, ci + 1 < nch ? c0 - kC : -1);
      // DG with crow: <S_c, R> at chunk c's end (R: the gradient there), over this warpgroup's rows. Loop A
      // kept the states after the even chunks only; an odd c dots the one before it,
      // <S_c, R> = a_c <S_(c-1), R> + <L_c, R> (a_c: the chunk's total gate, applied once the chunk's tile
      // is read below; the <L_c, R> term is WG1's, from dv's state term).
      const int c = nch - 1 - ci;
      float part = 0.f;
      if constexpr (DG && RMB >= 0) {
        if (crow) {
          if (c >= 1) {  // the words chunk c - 1 reads into L2 now: they are read one chunk from now
            const uint4* nx = crow + (size_t)((c - 1) >> 1) * kChunkWords + (threadIdx.x & 127);
#pragma unroll
            for (int w = 0; w < NE * 4; ++w) mma::prefetch_l2(nx + (RMB * NE * 4 + w) * 128);
          }
          if (c + 1 < nch) {
            const uint4* src = crow + (size_t)(c >> 1) * kChunkWords + (threadIdx.x & 127);
#pragma unroll
            for (int nb = 0; nb < NE; ++nb)
#pragma unroll
              for (int j4 = 0; j4 < 4; ++j4) {
                const uint4 u = src[((RMB * NE + nb) * 4 + j4) * 128];
                const float* r = &R[nb][8 * j4];
                const float2 s0 = mma::unpack2<T>(u.x), s1 = mma::unpack2<T>(u.y), s2 = mma::unpack2<T>(u.z),
                             s3 = mma::unpack2<T>(u.w);
                part += s0.x * r[0] + s0.y * r[1] + s1.x * r[2] + s1.y * r[3] + s2.x * r[4] + s2.y * r[5] +
                        s3.x * r[6] + s3.y * r[7];
              }
          } else if (seg + 1 < a.nseg) {  // the segment's last chunk: the next segment's incoming state (fp32)
            const float* sx = a.seg_S + ((size_t)bh * a.nseg + seg + 1) * DE;
#pragma unroll
            for (int nb = 0; nb < NE; ++nb) {
              float s[32];
              wg::load_acc(s, sx, E, 64 * RMB + r0, 64 * nb);
#pragma unroll
              for (int i = 0; i < 32; ++i) part += s[i] * R[nb][i];
            }
          }  // (the row's last chunk: no gradient after it; chunk_T stays 0)
        }
      }
      tma::wait(barB + 8u * (uint32_t)(ci & 1), (uint32_t)(ci >> 1) & 1u);
      wg::fence_async_smem();
      block_sync();
      const auto view = wg::ChunkView<GM>::at(Gp, tile(ci));
      if (threadIdx.x == 0 && ci + 1 < nch) issue_B(ci + 1);
      if constexpr (DG && RMB >= 0) {
        if (crow) {
          if ((c & 1) && c + 1 < nch) part *= view.pre(len - 1);  // a_c <S_(c-1), R>
          add_chunk_T(c, part);
        }
      }
      float acc[NOUT][32], P[32];
#pragma unroll
      for (int nb = 0; nb < NOUT; ++nb) wg::zero_acc(acc[nb]);
      wg::zero_acc(P);
      wg::fence();
      // P first (V dO^T / K Q^T: masked while the second group runs), then acc (V R_b^T / K R_b)
      {
        const uint32_t at = W == 0 ? st + SM::V : st + SM::K, bt = W == 0 ? st + SM::DO : st + SM::Q;
        constexpr int KS = (W == 0 ? E : D) / 16;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) wg::mma_ss_n64<T, 0, 0>(P, wg::kmajor(at, kk), wg::kmajor(bt, kk), 1);
      }
      wg::commit();
      if constexpr (W == 0) {
#pragma unroll
        for (int kk = 0; kk < E / 16; ++kk) {
          const uint64_t da = wg::kmajor(st + SM::V, kk);
#pragma unroll
          for (int nb = 0; nb < ND; ++nb) wg::mma_ss_n64<T, 0, 0>(acc[nb], da, state_kmajor(sbuf(ci), nb, kk), 1);
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint64_t da = wg::kmajor(st + SM::K, kk);
#pragma unroll
          for (int nb = 0; nb < NE; ++nb) wg::mma_ss_n64<T, 0, 1>(acc[nb], da, wg::mnmajor(sbuf(ci), D * 128, nb, kk), 1);
        }
      }
      wg::commit();
      // R = g^len R + scale Q^T diag(g^(t+1)) dO (this warpgroup's block of rows): its fragments now,
      // its scaling once no wgmma is in flight, its wgmmas beside dk's / dv's
      uint32_t xa[4][4];
      if constexpr (RMB >= 0) state_frags<T, true>(xa, st + SM::Q, RMB, r0, len, true, scale, view);
      wg::wait<1>();
      wg::fence_regs(P);
      uint32_t pa[4][4];
      float pd0 = 0.f, pd1 = 0.f;  // DG, WG0: the diagonal of the masked P (as in loop A)
      view.template pack<T, false>(P, pa, r0, scale);
      if constexpr (DG) {
        if (W == 0 && dgrow) wg::diag_rounded<T>(P, r0, scale, pd0, pd1);
      }
      wg::wait<0>();
#pragma unroll
      for (int nb = 0; nb < NOUT; ++nb) wg::fence_regs(acc[nb]);
      {
        const float ws0 = r0 + g < len ? view.w(len - 1, r0 + g) : 0.f;
        const float ws1 = r0 + g + 8 < len ? view.w(len - 1, r0 + g + 8) : 0.f;
#pragma unroll
        for (int nb = 0; nb < NOUT; ++nb) wg::scale_rows(acc[nb], ws0, ws1);
      }
      if constexpr (RMB >= 0) wg::scale_state(R, view.pre(len - 1));
      if constexpr (DG && W == 1) {  // an odd chunk's <L_c, R> (its <S_c, R> reads the kept state before it)
        if (crow && (c & 1) && c + 1 < nch) {  // = sum_s v[s] . (diag(suf) K R_b)[s], before P dO is added
          float d0, d1;
          wg::row_dots<T, NOUT>(acc, sm + (st - base) + SM::V, r0, d0, d1);
          add_chunk_T(c, tc == 0 ? d0 + d1 : 0.f);
        }
      }
#pragma unroll
      for (int nb = 0; nb < NOUT; ++nb) wg::fence_regs(acc[nb]);
      wg::fence();
      {
        const uint32_t bt = W == 0 ? st + SM::Q : st + SM::DO;  // dk += P Q, dv += P dO
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int nb = 0; nb < NOUT; ++nb) wg::mma_rs_n64<T, 1>(acc[nb], pa[kk], wg::mnmajor(bt, kAtom, nb, kk), 1);
      }
      if constexpr (RMB >= 0) state_issue<T, NE>(R, xa, st + SM::DO);
      wg::commit();
      wg::wait<0>();
#pragma unroll
      for (int nb = 0; nb < NOUT; ++nb) wg::fence_regs(acc[nb]);
      if constexpr (DG && W == 0) {
        if (dgrow) {  // - k[s].dk_h[s] without the pair (s, s) (the thread that stored q[s].dq_h[s] in loop A)
          float d0, d1, x0, x1;
          wg::row_dots<T, NOUT>(acc, sm + (st - base) + SM::K, r0, d0, d1);
          wg::row_dots_tiles<T, ND>(sm + (st - base) + SM::K, sm + (st - base) + SM::Q, r0, x0, x1);
          d0 -= pd0 * x0;
          d1 -= pd1 * x1;
          if (tc == 0 && r0 + g < len) dgrow[c0 + r0 + g] -= d0;
          if (tc == 0 && r0 + g + 8 < len) dgrow[c0 + r0 + g + 8] -= d1;
        }
      }
#pragma unroll
      for (int nb = 0; nb < NOUT; ++nb) {
        if constexpr (ACC) {  // per query head (the driver finishes in the kernel only without GQA)
          mma::store_frag_acc<T, 8>(reinterpret_cast<const float(*)[4]>(acc[nb]), accs.x[W == 0 ? 1 : 2], b, h, c0,
                                    r0, 64 * nb, len, W == 0 ? a.D : a.E);
        } else if (a.red & (W == 0 ? 2 : 4)) {  // shared k / v heads: added into the head's fp32 sum
          tma::reduce_acc_rows_f32<SM::NSTG>(acc[nb], W == 0 ? &tm.dk : &tm.dv, sm, base, stg, nstore, r0, len, 64 * nb,
                                             c0 + r0, W == 0 ? kh : vh, b);
        } else {
          tma::store_acc_rows<T, SM::NSTG>(acc[nb], W == 0 ? &tm.dk : &tm.dv, sm, base, stg, nstore, r0, len, 64 * nb,
                                     c0 + r0, W == 0 ? hk : hv, b);
        }
      }
      if constexpr (RMB >= 0) {
#pragma unroll
        for (int nb = 0; nb < NE; ++nb) wg::fence_regs(R[nb]);
        if (ci + 1 < nch) write_rows(R, sbuf(ci + 1), RMB);
      }
    }
    if constexpr (RMB >= 0) {
      if (a.grad_state_in && seg == 0) {  // the state gradient before the sequence's first chunk
#pragma unroll
        for (int nb = 0; nb < NE; ++nb) wg::store_acc_f32(R[nb], a.grad_state_in + (size_t)bh * DE, E, 64 * RMB + r0, 64 * nb);
      }
    }
  };
  if (wgi == 0) {
    loop_B(std::integral_constant<int, 0>{});
  } else {
    loop_B(std::integral_constant<int, 1>{});
  }
  if (lane == 0) tma::store_wait_all();  // the staging atoms stay valid until the stores have read them
#else
  __trap();  // built for a target without wgmma; the host never launches this there
#endif
}

// D = E = 64: two blocks per SM (registers capped at 128, with spills; ptxas serializes some wgmmas for
// want of registers). Measured against one uncapped block (192-196 registers, no spills) on one H200
// (2026-12-01, benchmarks/results/wgmma_bwd_d64_blocks_h200_2026-12-01.md): the kernel is 3-11% faster
// with two, at 8x16x2048, 1x12x65536 and 1x3x262144.
template <int D, int E>
constexpr int kBwdMinBlocks = (D == 64 && E == 64) ? 2 : 1;

template <typename T, int D, int E, int MINB, bool ACC, int GM>
cudaError_t launch_minb(const AttnParams& p, const BwdArgs& a, const AccOut* acc,
                        const HeadWs& ws, cudaStream_t st) {
  constexpr size_t smem = WgBwdSmem<D, E>::bytes;
  cudaError_t e = opt_in_smem<wgmma_bwd_kernel<T, D, E, MINB, ACC, GM>>(smem);
  if (e != cudaSuccess) return e;
  const unsigned blocks = (unsigned)(p.B * p.H * a.nseg);
  const bool bf = std::is_same<T, __nv_bfloat16>::value;
  BwdMaps tm;
  std::memset(&tm, 0, sizeof tm);
  bool ok = tma::make_map(&tm.q, p.q, bf, p.B, q_heads(p), p.N, p.D, kC) &&
            tma::make_map(&tm.k, p.k, bf, p.B, p.Hkv, p.N, p.D, kC) &&
            tma::make_map(&tm.v, p.v, bf, p.B, v_heads(p), p.N, p.E, kC) &&
            tma::make_map(&tm.dout, p.dout, bf, p.B, p.H, p.N, p.E, kC);
  // dq, dk, dv by TMA into the outputs, or where heads are shared per output head into the 16-bit workspace
  // (HeadWs), or added into its fp32 sums over the shared heads (HeadWs::f32)
  auto contig = [&](void* ptr, int64_t Hx, int64_t X) {  // a contiguous (B, Hx, N, X) workspace
    TensorView4 t;
    t.ptr = ptr;
    t.stride[0] = Hx * p.N * X;
    t.stride[1] = p.N * X;
    t.stride[2] = X;
    t.stride[3] = 1;
    return t;
  };
  auto out_map = [&](CUtensorMap* m, void* w, const TensorView4& out, int64_t Hx, int64_t X) {
    if (!w) return tma::make_map(m, out, bf, p.B, Hx, p.N, X, 16);
    if (ws.f32) return tma::make_map(m, contig(w, Hx, X), tma::kMapF32, p.B, Hx, p.N, X, 16);
    return tma::make_map(m, contig(w, p.H, X), bf, p.B, p.H, p.N, X, 16);
  };
  if (ok && !ACC)
    ok = out_map(&tm.dq, ws.dq, p.dq, q_heads(p), p.D) && out_map(&tm.dk, ws.dk, p.dk, p.Hkv, p.D) &&
         out_map(&tm.dv, ws.dv, p.dv, v_heads(p), p.E);
  if (!ok) return cudaErrorNotSupported;  // fast::view_ok admits only views the driver maps
  AccOuts accs{};
  if (acc)
    for (int i = 0; i < 3; ++i) accs.x[i] = acc[i];
  wgmma_bwd_kernel<T, D, E, MINB, ACC, GM><<<blocks, kThreads, smem, st>>>(a, tm, accs);
  return cudaGetLastError();
}

template <typename T, int D, int E, bool ACC>
cudaError_t launch(const AttnParams& p, const BwdArgs& a, const AccOut* acc, const HeadWs& ws, cudaStream_t st) {
  if constexpr (ACC) {  // gates never come with head-dim blocks (blocks_shape refuses them)
    return a.g ? cudaErrorInvalidValue
               : launch_minb<T, D, E, kBwdMinBlocks<D, E>, true, 0>(p, a, acc, ws, st);
  } else {
    if (!a.g) return launch_minb<T, D, E, kBwdMinBlocks<D, E>, false, 0>(p, a, acc, ws, st);
    return p.g_resets ? launch_minb<T, D, E, kBwdMinBlocks<D, E>, false, 2>(p, a, acc, ws, st)
                      : launch_minb<T, D, E, kBwdMinBlocks<D, E>, false, 1>(p, a, acc, ws, st);
  }
}

template <typename T, bool ACC = false>
cudaError_t launch_dims(const AttnParams& p, const BwdArgs& a, cudaStream_t st, const AccOut* acc = nullptr,
                        const HeadWs& ws = HeadWs{}) {
  return with_dims(p, [&](auto d, auto e) {
    return launch<T, decltype(d)::value, decltype(e)::value, ACC>(p, a, acc, ws, st);
  });
}

template <typename T, int D, int E>
int resident() {
  return resident_blocks<wgmma_bwd_kernel<T, D, E, kBwdMinBlocks<D, E>, false, 0>>(kThreads, WgBwdSmem<D, E>::bytes, 1);
}

template <typename T>
int resident_dims(const AttnParams& p) {
  return with_dims(p, [](auto d, auto e) { return resident<T, decltype(d)::value, decltype(e)::value>(); });
}

}  // namespace

size_t wgmma_bwd_smem_bytes(const AttnParams& p) {
  return with_dims(p, [](auto d, auto e) { return WgBwdSmem<decltype(d)::value, decltype(e)::value>::bytes; });
}

int wgmma_bwd_blocks_per_sm(const AttnParams& p) {
  return with_type(p, [&](auto t) {
    using T = typename decltype(t)::type;
    return resident_dims<T>(p);
  });
}

cudaError_t wgmma_bwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_S, const float* seg_G,
                           const HeadWs& ws, cudaStream_t st, const AccOut* acc, void* chunk_S,
                           float* chunk_T) {
  return with_type(p, [&](auto t) {
    using T = typename decltype(t)::type;
    if (acc)  // head-dim blocks: dq, dk, dv as acc[0..2] say, per output head
      return launch_dims<T, true>(p, make_bwd_args(p, nseg, seglen, seg_S, seg_G, true, true), st, acc);
    BwdArgs a = make_bwd_args(p, nseg, seglen, seg_S, seg_G, !ws.f32 && ws.dk, !ws.f32 && ws.dv);
    if (ws.f32) a.red = (ws.dq ? 1 : 0) | (ws.dk ? 2 : 0) | (ws.dv ? 4 : 0);
    a.dg = static_cast<float*>(p.dg_part);
    a.chunk_S = chunk_S;
    a.chunk_T = chunk_T;
    return launch_dims<T>(p, a, st, nullptr, ws);
  });
}

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
