// Phase 1 (the local state of each segment) with Hopper warpgroup MMAs (wgmma, sm_90a), bf16/fp16, D, E in
// {64, 128}: the contract of state_local_kernel (fast_fwd.cu), chosen by the plan (plan.cu) where the wgmma
// main kernels run.
//
//   REV = false: L = sum_s g^(n1-1-s) k[s]^T v[s]            over the segment [n0, n1)   (x = k, y = v)
//   REV = true:  M = scale sum_t g^(t-n0+1) q[t]^T do[t]                                  (x = q, y = do)
//
// Every token's weight is taken relative to the segment's end (L) or start (M), exp(-rate * distance) in
// fp32, so the state is one long accumulation: no per-chunk rescaling of the accumulators, and no wgmma
// group ever waits for ordinary code. With per-token gates (lam = g - rate) the weight is the exp of a sum
// over the token's own range, never a difference of prefix sums (a -inf gate, a reset, gives exact zeros):
// L visits the chunks last to first and M first to last, each warp carrying the sum over the chunks it
// has visited and scanning the chunk's 64 gates (two per lane) for the sums inside it.
//
// One block of D / 64 warpgroups per (b, h, segment); warpgroup w holds
// rows 64w .. 64w+63 of the D x E fp32 state in registers. Per chunk of 64 tokens: the A operand X^T
// (ldmatrix.trans from the swizzled x tile, scaled by the weights) and y as the MN-major B operand from
// shared memory. ST stages of TMA loads (thread 0 issues them, an mbarrier per stage says when they have
// landed; tma.cuh) keep ST - 2 chunks in flight while one is multiplied; one wgmma group (the previous
// chunk's) stays in flight while the next chunk's fragments are made.
#include <type_traits>

#include "common.cuh"
#include "dispatch.h"
#include "fast_args.h"
#include "fast_path.h"
#include "launch_cache.h"
#include "mma.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace lasp {
namespace cuda {
namespace fast {

namespace {

using namespace detail;

constexpr int kC = 64;
constexpr uint32_t kAtom = wg::kTileAtom;

template <int D, int E, int ST>
struct WgStateSmem {
  static constexpr uint32_t X = 0, Y = (D / 64) * kAtom;
  static constexpr uint32_t STAGE = Y + (E / 64) * kAtom;
  static constexpr uint32_t BAR = ST * STAGE;  // ST mbarriers
  static constexpr size_t bytes = (size_t)BAR + ST * 8 + 1024;  // + alignment slack
};

template <int D>
constexpr int kStateThreads = (D / 64) * 128;

template <typename T, int D, int E, bool REV, int ST>
__global__ void __launch_bounds__(kStateThreads<D>, 1)
    wgmma_state_kernel(FwdArgs a, const __grid_constant__ CUtensorMap tx, const __grid_constant__ CUtensorMap ty) {
#if LASP_WGMMA
  using SM = WgStateSmem<D, E, ST>;
  constexpr int NE = E / 64;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = mma::smem_addr(smem_raw);
  const uint32_t base = raw + ((1024u - (raw & 1023u)) & 1023u);

  const int seg = a.loc_first + (int)(blockIdx.x % a.loc_count), bh = (int)(blockIdx.x / a.loc_count);
  // x: q (REV) or k; y: dout (REV, per output head) or v
  const int b = bh / a.H, h = bh % a.H, hx = h / (REV ? a.qgroup : a.group), hy = REV ? h : h / a.vgroup;
  const int wgi = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 7), 0);  // warp-uniform to the compiler
  const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, tc = lane & 3;
  const int m0 = 64 * wgi + 16 * warp;  // this warp's 16 rows d of the state
  const float lg = log_gamma(a.decay, h);
  const float* gates = a.g ? a.g + (size_t)bh * a.N : nullptr;  // row (b, h) of the gates, or null
  const bool weigh = REV || lg != 0.f || gates;  // L without decay or gates: every weight is 1

  const int64_t n0 = (int64_t)seg * a.seglen;
  const int64_t n1 = min((int64_t)a.N, n0 + a.seglen);
  const int nch = (int)((n1 - n0 + kC - 1) / kC);
  // visit i reads chunk order(i): with gates L goes from the segment's end (its weights are suffix sums)
  auto order = [&](int i) { return gates && !REV ? nch - 1 - i : i; };
  auto stage = [&](int i) { return base + (uint32_t)(i % ST) * SM::STAGE; };
  auto bar = [&](int i) { return base + SM::BAR + 8u * (uint32_t)(i % ST); };
  auto issue = [&](int i) {  // thread 0 only: visit i's x and y tiles (rows past N arrive as zeros)
    const int c0 = (int)n0 + order(i) * kC;
    tma::arrive_expect_tx(bar(i), SM::STAGE);
    tma::load_atoms(stage(i) + SM::X, &tx, bar(i), D / 64, 0, c0, hx, b);
    tma::load_atoms(stage(i) + SM::Y, &ty, bar(i), NE, 0, c0, hy, b);
  };
  if (threadIdx.x == 0) {
    tma::prefetch_map(&tx);
    tma::prefetch_map(&ty);
    tma::init_barriers(bar(0), ST);
  }
  __syncthreads();
  // Prologue: chunks 0 .. ST-3 in flight.
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < ST - 2; ++i)
      if (i < nch) issue(i);
  }
  float acc[NE][32];
#pragma unroll
  for (int nb = 0; nb < NE; ++nb) wg::zero_acc(acc[nb]);
  // One chunk. Its A fragments `xa` are read by the wgmmas after they are issued, so a chunk may not reuse
  // the registers of the chunk before it (whose group is still in flight): chunks alternate between two
  // fragment sets, and each waits for all but its own group, so the set it will overwrite next is free.
  float carry = 0.f;  // with gates: the sum of lam over the chunks visited so far (the same in every lane)
  // With gates, lane l's two gates of tokens 2l, 2l + 1 of the next visit, as loaded, and whether each lies
  // before n1: loaded one visit ahead, so that their latency passes while a chunk is multiplied (read at the
  // visit's start, they held every warp there).
  float gx0 = 0.f, gx1 = 0.f;
  bool gv0 = false, gv1 = false;
  auto load_gates = [&](int i) {
    const int64_t t0 = n0 + (int64_t)order(i) * kC + 2 * lane;
    gv0 = t0 < n1;
    gv1 = t0 + 1 < n1;
    if (gv0) gx0 = gates[t0];
    if (gv1) gx1 = gates[t0 + 1];
  };
  if (gates && nch > 0) load_gates(0);
  auto chunk = [&](int ci, uint32_t (&xa)[4][4]) {
    const int64_t c0 = n0 + (int64_t)order(ci) * kC;
    // With gates, lane l's two log gates lam[c0 + 2l], lam[c0 + 2l + 1] (0 past n1).
    float x0 = 0.f, x1 = 0.f;
    if (gates) {
      x0 = gv0 ? gx0 + lg : 0.f;
      x1 = gv1 ? gx1 + lg : 0.f;
      if (ci + 1 < nch) load_gates(ci + 1);
    }
    tma::wait(bar(ci), (uint32_t)(ci / ST) & 1u);  // visit ci's tiles have landed
    // Every warpgroup has finished the wgmmas of visit ci - 2 (it waited for them in the previous one):
    // its stage may be refilled.
    __syncthreads();
    if (threadIdx.x == 0 && ci + ST - 2 < nch) issue(ci + ST - 2);
    // With gates, each lane's log weights of its tokens 2l, 2l + 1: M the sum of lam from n0 through the
    // token, L the sum over the tokens after it up to n1. Sums of ranges only (see the top of the file).
    float lw0 = 0.f, lw1 = 0.f;
    if (gates) {
      float inc = x0 + x1;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {  // inclusive scan over lanes: M upwards, L downwards
        const float y = REV ? __shfl_up_sync(0xffffffffu, inc, o) : __shfl_down_sync(0xffffffffu, inc, o);
        if (REV ? lane >= o : lane + o < 32) inc += y;
      }
      float ex = REV ? __shfl_up_sync(0xffffffffu, inc, 1) : __shfl_down_sync(0xffffffffu, inc, 1);
      if (lane == (REV ? 0 : 31)) ex = 0.f;
      lw0 = REV ? carry + ex + x0 : carry + ex + x1;
      lw1 = REV ? carry + inc : carry + ex;
      carry += __shfl_sync(0xffffffffu, inc, REV ? 31 : 0);
    }
    const uint32_t xt = stage(ci) + SM::X, yt = stage(ci) + SM::Y;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      wg::load_a_t_sw128(xa[kk], xt, kAtom, m0, kk * 16);
      if (weigh) {
        float w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int tl = kk * 16 + 2 * tc + (j & 1) + (j >> 1) * 8;  // the token's row in the chunk
          if (gates) {
            const float e0 = __shfl_sync(0xffffffffu, lw0, tl >> 1), e1 = __shfl_sync(0xffffffffu, lw1, tl >> 1);
            w[j] = (REV ? a.scale : 1.f) * expf((tl & 1) ? e1 : e0);
          } else {
            const int64_t t = c0 + tl;
            // rows past n1 are zero-filled, and their weight is never used to scale anything but zeros
            const float dist = REV ? (float)(t - n0 + 1) : (float)(n1 - 1 - t);
            w[j] = (REV ? a.scale : 1.f) * expf(lg * fmaxf(dist, 0.f));
          }
        }
        xa[kk][0] = mma::scale2<T>(xa[kk][0], w[0], w[1]);
        xa[kk][1] = mma::scale2<T>(xa[kk][1], w[0], w[1]);
        xa[kk][2] = mma::scale2<T>(xa[kk][2], w[2], w[3]);
        xa[kk][3] = mma::scale2<T>(xa[kk][3], w[2], w[3]);
      }
    }
    wg::fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int nb = 0; nb < NE; ++nb) wg::mma_rs_n64<T, 1>(acc[nb], xa[kk], wg::mnmajor(yt, kAtom, nb, kk), 1);
    wg::commit();
    wg::wait<1>();  // chunk ci - 1's group is done: its fragments and (after the next barrier) its stage are free
  };
  uint32_t xa0[4][4], xa1[4][4];
  for (int ci = 0; ci < nch; ci += 2) {
    chunk(ci, xa0);
    if (ci + 1 < nch) chunk(ci + 1, xa1);
  }
  wg::wait<0>();
#pragma unroll
  for (int nb = 0; nb < NE; ++nb) wg::fence_regs(acc[nb]);
  float* out = a.local_out + ((size_t)bh * a.nseg + seg) * D * E;
#pragma unroll
  for (int nb = 0; nb < NE; ++nb) wg::store_acc_f32(acc[nb], out, E, m0, 64 * nb);
#else
  __trap();  // built for a target without wgmma; the host never launches this there
#endif
}

// Four stages (two chunks in flight): 1x16x65536x128 on one H200 measured 0.174 ms per L call with four,
// 0.172 with five, 0.184 with three (before the fragment fix above; benchmarks/results/kernels_ab_h200_2026-12-01c.md).
constexpr int kStages = 4;

template <typename T, int D, int E, bool REV, int ST>
cudaError_t launch_st(const AttnParams& p, const FwdArgs& a, const TensorView4& x, const TensorView4& y,
                      cudaStream_t st) {
  constexpr size_t smem = WgStateSmem<D, E, ST>::bytes;
  cudaError_t e = opt_in_smem<wgmma_state_kernel<T, D, E, REV, ST>>(smem);
  if (e != cudaSuccess) return e;
  const unsigned blocks = (unsigned)(p.B * p.H * a.loc_count);
  const bool bf = std::is_same<T, __nv_bfloat16>::value;
  const int64_t xheads = REV ? q_heads(p) : p.Hkv, yheads = REV ? p.H : v_heads(p);
  CUtensorMap tx, ty;
  if (!tma::make_map(&tx, x, bf, p.B, xheads, p.N, p.D, kC) || !tma::make_map(&ty, y, bf, p.B, yheads, p.N, p.E, kC))
    return cudaErrorNotSupported;  // fast::view_ok admits only views the driver maps
  wgmma_state_kernel<T, D, E, REV, ST><<<blocks, kStateThreads<D>, smem, st>>>(a, tx, ty);
  return cudaGetLastError();
}

}  // namespace

cudaError_t wgmma_state_local(const AttnParams& p, bool reverse, int nseg, int seglen, int skip, float* out,
                              cudaStream_t st) {
  const FwdArgs a = make_local_args(p, reverse, nseg, seglen, skip, out);
  return with_type_dims(p, [&](auto t, auto d, auto e) {
    using T = typename decltype(t)::type;
    constexpr int D = decltype(d)::value, E = decltype(e)::value;
    return reverse ? launch_st<T, D, E, true, kStages>(p, a, p.q, p.dout, st)
                   : launch_st<T, D, E, false, kStages>(p, a, p.k, p.v, st);
  });
}

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
