// Forward main kernel with Hopper warpgroup MMAs (wgmma, sm_90a), bf16/fp16, D in {64, 128}, E a
// multiple of 64 up to 128: the same contract, grid and segment plan as fwd_main_kernel (fast_fwd.cu),
// chosen by the plan (plan.cu) on compute capability 9.0 devices unless lasp::cuda::fwd_kernel() is Mma.
//
// One block = one warpgroup (4 warps) per (b, h, segment, 64-column tile of E), chunks of 64, double-buffered
// TMA loads of q, k, v into 128B-swizzled shared memory (tma.cuh: thread 0 issues them, an mbarrier per
// stage says when they have landed); o leaves by TMA stores of each warp's 16 rows. Per chunk:
//   O = Q S_b            (SS: Q K-major, S_b = the 16-bit state copy, [d][e] MN-major)
//   P = Q K^T            (SS: Q and K K-major)
//   O = diag(scale g^(t+1)) O + ((scale P) * decay mask) V      (RS: P from registers, V MN-major)
//   S = g^len S + (K^T diag(g^(len-1-s))) V                      (RS: K^T by ldmatrix.trans, V MN-major)
// GM (gate mode, wgmma.cuh ChunkView): 0 the powers of g; 1 per-token gates (lasp_params.h), whose chunk
// weights w(t, s), pre(t), suf(s), tot warp 0 scans (GateTile) from the log gates it loaded a chunk ahead;
// 2 document starts only (AttnParams::g_resets): the powers of g cut at the starts, from a 64-bit mask of
// the chunk's starts that warp 0 makes from the same loads (ResetTile).
// S lives in fp32 registers (warp w: rows 64i + 16w .. of the D x 64 state), S_b is rewritten after
// each chunk. Bytes as the mma.sync kernel: q, k, v read once per column tile, o written once.
// ACC (head dims above 128, cut into blocks by lasp_cuda.cu): o is one term of a sum over the blocks of D,
// left as the AccOut says (fast_args.h) by direct stores from the accumulator registers.
// DL (the gated delta rule's main pass, delta_fwd_wgmma): the values of the chunk are U = W_v - W_k S_b
// (kernels/DESIGN.md, "The sm_90a forward"), made in the chunk from W_v (in V's stage slot) and W_k (one more
// stage slot, D / 64 atoms) by one more SS group, X = W_k S_b, issued with P; U goes to a 16-bit MN-major
// tile (the operand of P U and of the state update: a block barrier, since every warp reads every row),
// and the chunk then runs as the gated one with U for V.
#include <type_traits>

#include "common.cuh"
#include "dispatch.h"
#include "fast_args.h"
#include "fast_path.h"
#include "lasp_cuda.h"
#include "launch_cache.h"
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
constexpr int kEt = 64;
constexpr int kThreads = 128;  // one warpgroup
constexpr uint32_t kAtom = wg::kTileAtom;

// Shared memory (bytes, from a 1024-aligned base): 2 stages of Q, K (D / 64 atoms each) and V (1 atom),
// S_b (D rows x 128 B), the O staging tile (one swizzled atom, the TMA store's source), the decay powers,
// the chunk's gate tile (GM > 0)
// and the two stages' mbarriers.
// DL: each stage also holds W_k (D / 64 atoms; V's slot holds W_v), and the U tile (one atom) follows the
// staging atom.
template <int D, bool DL = false>
struct WgSmem {
  static constexpr uint32_t Q = 0, K = (D / 64) * kAtom, V = 2 * (D / 64) * kAtom;
  static constexpr uint32_t WK = V + kAtom;
  static constexpr uint32_t STAGE = WK + (DL ? (D / 64) * kAtom : 0);
  static constexpr uint32_t SB = 2 * STAGE;
  static constexpr uint32_t OST = SB + D * 128;
  static constexpr uint32_t UT = OST + kAtom;
  static constexpr uint32_t GP = UT + (DL ? kAtom : 0);
  static constexpr uint32_t GT = GP + (kC + 2) * sizeof(float);  // the chunk's GateTile / ResetTile (GM > 0)
  static constexpr uint32_t BAR = GT + sizeof(wg::GateTile);
  static constexpr size_t bytes = BAR + 2 * 8 + 1024;  // + alignment slack
  static_assert(Q == 0 && K % 1024 == 0 && V % 1024 == 0 && WK % 1024 == 0 && SB % 1024 == 0 && OST % 1024 == 0 &&
                    UT % 1024 == 0 && BAR % 8 == 0,
                "atoms are 1024-byte aligned");
};

#if LASP_WGMMA  // device helpers of the kernel below (its body is empty in other targets)
#endif

template <typename T, int D, bool ACC, int GM, bool DL = false>
__global__ void __launch_bounds__(kThreads, DL ? 1 : (D == 128 ? 2 : 3))
    wgmma_fwd_kernel(FwdArgs a, const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                     const __grid_constant__ CUtensorMap tv, const __grid_constant__ CUtensorMap to, AccOut oacc,
                     const __grid_constant__ CUtensorMap twk) {
#if LASP_WGMMA
  static_assert(!DL || (GM == 1 && !ACC), "the delta rule's main pass is gated and has no head-dim blocks");
  using SM = WgSmem<D, DL>;
  constexpr int MI = D / 64;  // 64-row blocks of the state
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = mma::smem_addr(smem_raw);
  const uint32_t pad = (1024u - (raw & 1023u)) & 1023u;
  unsigned char* sm = smem_raw + pad;
  const uint32_t base = raw + pad;
  float* Gp = reinterpret_cast<float*>(sm + SM::GP);
  constexpr bool GATED = GM != 0;
  void* const tile = sm + SM::GT;

  const int ntile = a.E / kEt;
  const int et = blockIdx.x % ntile;
  const int rest = blockIdx.x / ntile;
  const int seg = rest % a.nseg, bh = rest / a.nseg;
  const int b = bh / a.H, h = bh % a.H, qh = h / a.qgroup, kh = h / a.group, vh = h / a.vgroup;
  const int e0 = et * kEt;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  const float lg = log_gamma(a.decay, h);
  for (int i = threadIdx.x; i <= kC; i += kThreads) Gp[i] = expf(lg * (float)i);

  const int n0 = seg * a.seglen;
  const int n1 = min(a.N, n0 + a.seglen);
  const int nch = (n1 - n0 + kC - 1) / kC;
  const uint32_t bar0 = base + SM::BAR;
  // GM > 0: warp 0 holds the next chunk's log gates (lane l: tokens 2l, 2l + 1; 0 past the segment's end)
  // as loaded, with whether each lies before the end: their first use is the next tile's build, so the loads
  // stay in flight through this chunk's barrier and products instead of holding warp 0 before the barrier.
  const float* grow = GATED ? a.g + (size_t)bh * a.N : nullptr;
  float gn0 = 0.f, gn1 = 0.f;
  bool gv0 = false, gv1 = false;
  auto load_gates = [&](int ci) {
    const int t = n0 + ci * kC + 2 * lane;
    gv0 = t < n1;
    gv1 = t + 1 < n1;
    if (gv0) gn0 = grow[t];
    if (gv1) gn1 = grow[t + 1];
  };
  if (GATED && warp == 0 && nch > 0) load_gates(0);

  // Thread 0 only: chunk ci's tiles into stage ci & 1 (rows past N arrive as zeros).
  auto issue = [&](int ci) {
    const int c0 = n0 + ci * kC;
    const uint32_t st = base + (uint32_t)(ci & 1) * SM::STAGE, bar = bar0 + 8u * (uint32_t)(ci & 1);
    tma::arrive_expect_tx(bar, SM::STAGE);
    tma::load_atoms(st + SM::Q, &tq, bar, MI, 0, c0, qh, b);
    tma::load_atoms(st + SM::K, &tk, bar, MI, 0, c0, kh, b);
    tma::load(st + SM::V, &tv, bar, e0, c0, vh, b);
    if constexpr (DL) tma::load_atoms(st + SM::WK, &twk, bar, MI, 0, c0, h, b);
  };
  if (threadIdx.x == 0) {
    tma::prefetch_map(&tq);
    tma::prefetch_map(&tk);
    tma::prefetch_map(&tv);
    tma::prefetch_map(&to);
    if constexpr (DL) tma::prefetch_map(&twk);
    tma::init_barriers(bar0, 2);
  }
  __syncthreads();
  if (threadIdx.x == 0 && nch > 0) issue(0);

  // State rows of this warp: d = 64i + 16 warp + g (+8); columns e0 + 8j + 2tc (+1).
  float S[MI][32];
  auto write_sb = [&]() {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int d = 64 * i + 16 * warp + g + 8 * hh;
          *reinterpret_cast<uint32_t*>(sm + SM::SB + wg::sw128_offset(d, j) + 4 * tc) =
              mma::pack2<T>(S[i][4 * j + 2 * hh], S[i][4 * j + 2 * hh + 1]);
        }
  };
  {
    const float* S0 = a.nseg > 1 ? a.seg_states + ((size_t)bh * a.nseg + seg) * a.D * a.E
                                 : (a.state_in ? a.state_in + (size_t)bh * a.D * a.E : nullptr);
#pragma unroll
    for (int i = 0; i < MI; ++i) wg::load_acc(S[i], S0, a.E, 64 * i + 16 * warp, e0);
    write_sb();
  }

  const int r0 = 16 * warp;
  int nstore = 0;  // this warp's TMA stores (tma::store_acc_rows)
  for (int ci = 0; ci < nch; ++ci) {
    const int c0 = n0 + ci * kC;
    const int len = min(kC, n1 - c0);
    const uint32_t st = base + (uint32_t)(ci & 1) * SM::STAGE;
    if constexpr (ACC) mma::prefetch_frag_acc<8>(oacc, b, h, c0, r0, e0, len);  // read at the chunk's end
    if constexpr (GATED) {  // the chunk's gate tile (the previous chunk's readers passed its last sync)
      if (warp == 0) {
        wg::build_tile<GM>(tile, gv0 ? gn0 + lg : 0.f, gv1 ? gn1 + lg : 0.f);
        if (ci + 1 < nch) load_gates(ci + 1);
      }
    }
    tma::wait(bar0 + 8u * (uint32_t)(ci & 1), (uint32_t)(ci >> 1) & 1u);
    wg::fence_async_smem();  // this thread's S_b stores, for the async proxy
    __syncthreads();
    if (threadIdx.x == 0 && ci + 1 < nch) issue(ci + 1);
    const auto view = wg::ChunkView<GM>::at(Gp, tile);

    // ---- P = Q K^T, then O = Q S_b: two commit groups, so that the mask of P and the state update's
    // K^T fragments are made while the tensor cores still work on O ----
    float O[32], P[32];
    // the chunk's values: V, or (DL) the U tile made below
    const uint32_t vals = DL ? base + SM::UT : st + SM::V;
    auto issue_qk = [&]() {  // P = Q K^T, one commit group
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wg::mma_ss_n64<T, 0, 0>(P, wg::kmajor(st + SM::Q, kk), wg::kmajor(st + SM::K, kk), 1);
      }
      wg::commit();
    };
    auto issue_qs = [&]() {  // O = Q S_b, one commit group
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wg::mma_ss_n64<T, 0, 1>(O, wg::kmajor(st + SM::Q, kk), wg::mnmajor(base + SM::SB, kAtom, 0, kk), 1);
      }
      wg::commit();
    };
    if constexpr (DL) {  // X = W_k S_b and P = Q K^T; then U = W_v - X into the U tile, then O = Q S_b
      float X[32];
      wg::zero_acc(X);
      wg::zero_acc(P);
      wg::fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wg::mma_ss_n64<T, 0, 1>(X, wg::kmajor(st + SM::WK, kk), wg::mnmajor(base + SM::SB, kAtom, 0, kk), 1);
      }
      wg::commit();
      issue_qk();
      wg::wait<1>();
      wg::fence_regs(X);
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {  // rows r0 + g (+ 8) of the chunk, columns 8j + 2tc (+ 1) of the tile
          const uint32_t off = wg::sw128_offset(r0 + g + 8 * hh, j) + 4 * tc;
          const float2 wv = mma::unpack2<T>(*reinterpret_cast<const uint32_t*>(sm + (st - base) + SM::V + off));
          *reinterpret_cast<uint32_t*>(sm + SM::UT + off) =
              mma::pack2<T>(wv.x - X[4 * j + 2 * hh], wv.y - X[4 * j + 2 * hh + 1]);
        }
      wg::fence_async_smem();  // the U tile, for the wgmmas below
      __syncthreads();
      wg::zero_acc(O);
      wg::fence();
      issue_qs();
    } else {
      wg::zero_acc(O);
      wg::zero_acc(P);
      wg::fence();
      issue_qk();
      issue_qs();
    }

    // ---- K^T diag(w) fragments for the state update (no wgmma in flight touches them) ----
    uint32_t ka[4][MI][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int s0 = kk * 16 + 2 * tc;
      auto suf = [&](int s) { return s < len ? view.w(len - 1, s) : 0.f; };  // suf(s) = w(len - 1, s)
      const float w0 = suf(s0), w1 = suf(s0 + 1), w2 = suf(s0 + 8), w3 = suf(s0 + 9);
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        wg::load_a_t_sw128(ka[kk][i], st + SM::K, kAtom, 64 * i + r0, kk * 16);
        if (GATED || lg != 0.f) {  // without decay every weight is 1 (rows past len are zero-filled)
          ka[kk][i][0] = mma::scale2<T>(ka[kk][i][0], w0, w1);
          ka[kk][i][1] = mma::scale2<T>(ka[kk][i][1], w0, w1);
          ka[kk][i][2] = mma::scale2<T>(ka[kk][i][2], w2, w3);
          ka[kk][i][3] = mma::scale2<T>(ka[kk][i][3], w2, w3);
        }
      }
    }

    // ---- P's group done: (scale P) * mask, packed as RS A fragments (P itself is only read) ----
    wg::wait<1>();
    wg::fence_regs(P);
    uint32_t pa[4][4];
    view.template pack<T, true>(P, pa, r0, a.scale);
    // ---- O's group done: O *= scale g^(t+1) per row; S *= g^len (here: the compiler waits for every
    // wgmma in flight before it writes a register any wgmma wrote) ----
    wg::wait<0>();
    wg::fence_regs(O);
    wg::scale_rows(O, a.scale * view.pre(r0 + g), a.scale * view.pre(r0 + g + 8));
    wg::scale_state(S, view.pre(len - 1));
    wg::fence_regs(O);
    wg::fence();
    // ---- O += P V (first group), S += (K^T diag(w)) V (second: it runs while O is stored) ----
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wg::mma_rs_n64<T, 1>(O, pa[kk], wg::mnmajor(vals, kAtom, 0, kk), 1);
    wg::commit();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t dv = wg::mnmajor(vals, kAtom, 0, kk);
#pragma unroll
      for (int i = 0; i < MI; ++i) wg::mma_rs_n64<T, 1>(S[i], ka[kk][i], dv, 1);
    }
    wg::commit();
    wg::wait<1>();
    wg::fence_regs(O);

    // ---- store O: this warp's 16 rows through the staging atom, one TMA store (the previous chunk's store
    // must have read the atom first) ----
    if constexpr (ACC) {  // o summed over the blocks of D (fast_args.h, AccOut), without the staging atom
      mma::store_frag_acc<T, 8>(reinterpret_cast<const float(*)[4]>(O), oacc, b, h, c0, r0, e0, len, a.E);
    } else {
      tma::store_acc_rows<T, 1>(O, &to, sm, base, SM::OST, nstore, r0, len, e0, c0 + r0, h, b);
    }
    wg::wait<0>();
#pragma unroll
    for (int i = 0; i < MI; ++i) wg::fence_regs(S[i]);
    __syncthreads();  // every warp's wgmmas of this chunk (S_b and U tile reads) are done
    if (ci + 1 < nch) write_sb();
  }
  if (a.state_out && seg == a.nseg - 1) {  // the state after the sequence's last chunk
#pragma unroll
    for (int i = 0; i < MI; ++i) wg::store_acc_f32(S[i], a.state_out + (size_t)bh * a.D * a.E, a.E, 64 * i + 16 * warp, e0);
  }
  if (lane == 0) tma::store_wait_all();  // the staging atom stays valid until the stores have read it
#else
  __trap();  // built for a target without wgmma; the host never launches this there
#endif
}

// wk (DL only): W_k, (B, H, N, D) like p.q's dtype; p.v is then W_v (B, H, N, E).
template <typename T, int D, bool ACC, int GM, bool DL = false>
cudaError_t launch(const AttnParams& p, const FwdArgs& a, const AccOut* oacc, cudaStream_t st,
                   const TensorView4* wk = nullptr) {
  auto kern = wgmma_fwd_kernel<T, D, ACC, GM, DL>;
  const size_t smem = WgSmem<D, DL>::bytes;
  cudaError_t e = opt_in_smem<wgmma_fwd_kernel<T, D, ACC, GM, DL>>(smem);
  if (e != cudaSuccess) return e;
  const unsigned blocks = (unsigned)(p.B * p.H * a.nseg * (p.E / kEt));
  const bool bf = std::is_same<T, __nv_bfloat16>::value;
  CUtensorMap tq, tk, tv, to, twk;
  if (!tma::make_map(&tq, p.q, bf, p.B, q_heads(p), p.N, p.D, kC) ||
      !tma::make_map(&tk, p.k, bf, p.B, p.Hkv, p.N, p.D, kC) ||
      !tma::make_map(&tv, p.v, bf, p.B, v_heads(p), p.N, p.E, kC) || !tma::make_map(&to, p.o, bf, p.B, p.H, p.N, p.E, 16))
    return cudaErrorNotSupported;  // fast::view_ok admits only views the driver maps
  if (DL ? !tma::make_map(&twk, *wk, bf, p.B, p.H, p.N, p.D, kC) : false) return cudaErrorNotSupported;
  kern<<<blocks, kThreads, smem, st>>>(a, tq, tk, tv, to, oacc ? *oacc : AccOut{}, DL ? twk : tk);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_acc(const AttnParams& p, const FwdArgs& a, const AccOut* oacc, cudaStream_t st) {
  // gates never come with head-dim blocks (blocks_shape refuses them)
  if (a.g) {
    if (oacc) return cudaErrorInvalidValue;
    return p.g_resets ? launch<T, D, false, 2>(p, a, nullptr, st) : launch<T, D, false, 1>(p, a, nullptr, st);
  }
  return oacc ? launch<T, D, true, 0>(p, a, oacc, st) : launch<T, D, false, 0>(p, a, nullptr, st);
}

template <typename T, int D>
int resident() {
  return resident_blocks<wgmma_fwd_kernel<T, D, false, 0>>(kThreads, WgSmem<D>::bytes, 2);
}

}  // namespace

size_t wgmma_fwd_smem_bytes(const AttnParams& p) {
  return with_dim(p.D, [](auto d) { return WgSmem<decltype(d)::value>::bytes; });
}

int wgmma_fwd_blocks_per_sm(const AttnParams& p) {
  return with_type(p, [&](auto t) {
    return with_dim(p.D, [&](auto d) { return resident<typename decltype(t)::type, decltype(d)::value>(); });
  });
}

cudaError_t wgmma_fwd_main(const AttnParams& p, int nseg, int seglen, const float* seg_states, cudaStream_t st,
                           const AccOut* o_acc) {
  const FwdArgs a = make_fwd_args(p, nseg, seglen, seg_states);
  return with_type(p, [&](auto t) {
    return with_dim(p.D, [&](auto d) { return launch_acc<typename decltype(t)::type, decltype(d)::value>(p, a, o_acc, st); });
  });
}

bool delta_fwd_wgmma_takes(const AttnParams& p) {
  return wgmma_available() && wgmma_shape(p) && p.g && !p.decay && !p.g_resets && p.Hv == p.H && p.N > 0 &&
         p.N < (int64_t)INT32_MAX && p.B * p.H * (p.E / kEt) < (int64_t)INT32_MAX && fwd_supported(p);
}

cudaError_t delta_fwd_wgmma(const AttnParams& p, const TensorView4& wk, cudaStream_t st) {
  if (!delta_fwd_wgmma_takes(p) || !view_ok(wk, p, p.H)) return cudaErrorInvalidValue;
  const FwdArgs a = make_fwd_args(p, 1, (int)p.N);
  return with_type(p, [&](auto t) {
    return with_dim(p.D, [&](auto d) {
      return launch<typename decltype(t)::type, decltype(d)::value, false, 1, true>(p, a, nullptr, st, &wk);
    });
  });
}

}  // namespace fast
}  // namespace cuda
}  // namespace lasp
