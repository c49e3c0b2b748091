// Hopper warpgroup MMA (wgmma.mma_async, sm_90a) helpers for bf16 / fp16 with fp32 accumulation.
//
// Shared-memory operands use the 128-byte swizzle: a tile is stored as "atoms" of 8 rows x 128 bytes
// (64 16-bit elements per row), the 16-byte chunk c of row r at r * 128 + ((c ^ (r % 8)) * 16) from a
// 1024-byte aligned atom base (sw128_offset). Two operand forms are used (CUTLASS's canonical GMMA
// layouts, cute/atom/mma_traits_sm90_gmma.hpp):
//   K-major (the reduction dim contiguous, e.g. Q or K as [rows][D]): rows 128 B apart, 8-row groups
//     SBO = 1024 B apart; a k-step of 16 elements advances the start address by 32 B inside the atom;
//     D > 64 is a second atom of (rows x 128 B).
//   MN-major (the output dim contiguous, e.g. V as [s][E] used as B with K = s): 64 MN-elements per
//     128-B row, rows = the K index; SBO = 1024 B (next 8 K-rows), LBO = the stride between 64-wide
//     MN atoms; a k-step of 16 advances the start address by 16 rows = 2048 B.
// Accumulator layout of m64nN (per warp w of the warpgroup, g = lane / 4, c = lane % 4):
//   d[4j + 0..1] = (row 16w + g, cols 8j + 2c, +1), d[4j + 2..3] = (row 16w + g + 8, same cols),
// i.e. the mma.sync m16n8 C layout per 16-row slab; register A operands (RS form) use the mma.sync
// m16n8k16 A layout (mma.cuh).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "doc_starts.h"
#include "mma.cuh"

// wgmma exists only in the sm_90a target; other targets compile the kernels to a trap.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LASP_WGMMA 1
#else
#define LASP_WGMMA 0
#endif

namespace lasp {
namespace cuda {
namespace wg {

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` inside a 128B-swizzled atom.
__device__ __forceinline__ uint32_t sw128_offset(int row, int chunk) {
  return (uint32_t)(row * 128 + (((chunk ^ row) & 7) << 4));
}

// Shared-memory matrix descriptor, 128-byte swizzle (layout type 1).
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= (uint64_t)((smem_byte_addr & 0x3FFFF) >> 4);
  d |= (uint64_t)((lbo_bytes & 0x3FFFF) >> 4) << 16;
  d |= (uint64_t)((sbo_bytes & 0x3FFFF) >> 4) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}

__device__ __forceinline__ void fence() {
#if LASP_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if LASP_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wait() {
#if LASP_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Generic-proxy shared-memory writes (st.shared, cp.async) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_async_smem() {
#if LASP_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue / wait.
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// ldmatrix of 16-bit elements at shared-memory byte address `saddr` (4 8x8 matrices, transposed).
__device__ __forceinline__ void ldsm_x4_t_addr(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr));
}

// mma.sync / RS-form A fragment (16 x 16) of A = X^T, X a [k][m] tile in 128B-swizzled atoms of 64 m-columns
// (atom a at tile + a * atom_bytes, row k at k * 128 inside it): rows m0 .. m0+15, k0 .. k0+15.
__device__ __forceinline__ void load_a_t_sw128(uint32_t (&a)[4], uint32_t tile, uint32_t atom_bytes, int m0, int k0) {
  const int l = threadIdx.x & 31, j = l >> 3;
  const int row = k0 + (l & 7) + (j >> 1) * 8, m = m0 + (j & 1) * 8;
  ldsm_x4_t_addr(a, tile + (uint32_t)(m >> 6) * atom_bytes + sw128_offset(row, (m & 63) >> 3));
}

// One swizzle column of a 64-row tile: 64 rows x 128 bytes (64 16-bit elements per row).
constexpr uint32_t kTileAtom = 64 * 128;

// Descriptor of a 64-row swizzled tile (atoms of kTileAtom bytes along its columns) as a K-major operand,
// k-step kk of 16 elements.
__device__ __forceinline__ uint64_t kmajor(uint32_t tile, int kk) {
  return make_desc(tile + (uint32_t)(kk >> 2) * kTileAtom + (uint32_t)(kk & 3) * 32, 16, 1024);
}
// Descriptor of a swizzled tile as an MN-major operand: its rows are the K index (k-step kk = 16 rows),
// 64 MN-columns per 128-byte row, `atom` the 64-column block, atoms `atom_bytes` apart.
__device__ __forceinline__ uint64_t mnmajor(uint32_t tile, uint32_t atom_bytes, int atom, int kk) {
  return make_desc(tile + (uint32_t)atom * atom_bytes + (uint32_t)kk * 2048, atom_bytes, 1024);
}

// cp.async of a 64-row tile, W 16-bit columns, into swizzled atoms at `dst` (shared byte address) by NT
// threads: row r from rows + r * row_stride (elements) for r < len, zero-filled rows from len on. The same
// layout as a 64-column TMA box with the 128-byte swizzle (tma.cuh), which the sm_90a kernels load with;
// this loader serves the building-block tests.
template <int W, int NT, typename T>
__device__ __forceinline__ void cp_async_tile(uint32_t dst, const T* rows, int64_t row_stride, int len) {
  constexpr int CPR = W / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < 64 * CPR; i += NT) {
    const int r = i / CPR, c = i - r * CPR;
    const bool ok = r < len;
    const T* src = rows + (ok ? r : 0) * row_stride + c * 8;
    const uint32_t d = dst + (uint32_t)(c >> 3) * kTileAtom + sw128_offset(r, c & 7);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 16 : 0));
  }
}

// Multiply this thread's two rows of a 64 x 64 accumulator (rows g and g + 8 of its warp's slab) by f0, f1.
__device__ __forceinline__ void scale_rows(float (&d)[32], float f0, float f1) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    d[4 * j] *= f0;
    d[4 * j + 1] *= f0;
    d[4 * j + 2] *= f1;
    d[4 * j + 3] *= f1;
  }
}

// A masked 64 x 64 product in accumulator order (pm[4j + r]: row r0 + g + 8 (r >> 1), column 8j + 2tc + (r & 1))
// as the four k-steps' RS A fragments.
template <typename T>
__device__ __forceinline__ void pack_a_frags(const float (&pm)[32], uint32_t (&pa)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    pa[kk][0] = mma::pack2<T>(pm[8 * kk + 0], pm[8 * kk + 1]);
    pa[kk][1] = mma::pack2<T>(pm[8 * kk + 2], pm[8 * kk + 3]);
    pa[kk][2] = mma::pack2<T>(pm[8 * kk + 4], pm[8 * kk + 5]);
    pa[kk][3] = mma::pack2<T>(pm[8 * kk + 6], pm[8 * kk + 7]);
  }
}

// The masked product P (64 x 64 accumulator of this warp's 16 rows r0..) scaled by scale * g^|t - s| where
// the mask keeps it (causal: s <= t with rows t; anti-causal: t >= s with rows s), packed as 4 RS A
// fragments (k-steps of 16 columns).
template <typename T, bool CAUSAL>
__device__ __forceinline__ void mask_pack(const float (&P)[32], uint32_t (&pa)[4][4], int r0, float scale,
                                          const float* Gp) {
  // P is only read: it may be an accumulator of the group just completed while another is in flight
  // (the compiler would wait for that one before a write to P).
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  float pm[32];
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = r0 + g + (r >> 1) * 8, col = 8 * j + 2 * tc + (r & 1);
      const bool keep = CAUSAL ? col <= row : col >= row;
      pm[4 * j + r] = keep ? P[4 * j + r] * scale * Gp[CAUSAL ? row - col : col - row] : 0.f;
    }
  pack_a_frags<T>(pm, pa);
}

// A chunk's per-token gates (lasp_params.h, g), as the tensor-core kernels read them: with lam[i] the log
// gate of the chunk's token i (g - lambda; 0 past the chunk's end), cf[t] = the sum of the finite lam[i],
// i <= t, m the 64-bit mask of the chunk's resets (bit i: lam[i] = -inf, as in ResetTile) and
// rs[t] = last_start(m, t) (doc_starts.h), the last reset at or before t, or -1. Then
//   w(t, s) = rs[t] > s ? 0 : exp(cf[t] - cf[s])   (s <= t),   pre(t) = rs[t] >= 0 ? 0 : exp(cf[t]),
//   suf(s) = w(len - 1, s),   tot = pre(len - 1).
// A reset gives exact zeros (never inf - inf); differences of chunk-local sums lose at most |cf| eps.
// The tile holds ef[t] = exp(cf[t]) (pre) and, in two forms, what the weights are made of: where the
// chunk's sum cf[63] (its smallest cf) is at least kGateFactorMin (gate_factored, doc_starts.h), the
// weights are products of a row and a column factor, w(t, s) = ef[t] en[s] with en[s] = exp(-cf[s]), both
// normal floats there: no exp per weight; in other chunks w(t, s) = exp2(c2[t] - c2[s]) with c2 = cf log2(e).
// The two forms read the same places (a row value, a column value), so a masked product loads its values
// once and branches (uniformly over the block) only for the arithmetic.
struct GateTile {
  float ef[64];
  float x[64];  // fac: en; else c2
  unsigned long long m;
  int fac;  // gate_factored(cf[63])
};

// The GateTile of one chunk from warp 0: lane l holds the log gates lam[2l], lam[2l + 1].
__device__ __forceinline__ void gate_tile_scan(GateTile& gt, float x0, float x1) {
  const int lane = threadIdx.x & 31;
  const bool z0 = x0 == -INFINITY, z1 = x1 == -INFINITY;
  const float f0 = z0 ? 0.f : x0, f1 = z1 ? 0.f : x1;
  float inc = f0 + f1;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  float ex = __shfl_up_sync(0xffffffffu, inc, 1);
  if (lane == 0) ex = 0.f;
  const float c0 = ex + f0, c1 = inc;
  const bool fac = gate_factored(__shfl_sync(0xffffffffu, inc, 31));
  const unsigned a = __ballot_sync(0xffffffffu, z0), b = __ballot_sync(0xffffffffu, z1);
  constexpr float kLog2e = 1.4426950408889634f;
  *reinterpret_cast<float2*>(&gt.ef[2 * lane]) = make_float2(__expf(c0), __expf(c1));
  *reinterpret_cast<float2*>(&gt.x[2 * lane]) =
      fac ? make_float2(__expf(-c0), __expf(-c1)) : make_float2(c0 * kLog2e, c1 * kLog2e);
  if (lane == 0) {
    gt.m = starts_mask(a, b);
    gt.fac = fac ? 1 : 0;
  }
}

// w(t, s) (s <= t) from a row value of t and a column value of s, the chunk's form: fac: ef[t] en[s]; else
// exp2(c2[t] - c2[s]).
__device__ __forceinline__ float gate_weight(bool fac, float vt, float vs) { return fac ? vt * vs : exp2f(vt - vs); }

// The masked product in accumulator order (pm), its weights cut at a chunk's resets or document starts (m,
// doc_starts.h): CAUSAL keeps row's columns last_start(row) <= col <= row, else row's columns row <= col <
// next_start(row), each scaled by scale * wt(j, r, row, col) (the accumulator element 4j + r). Gate modes 1
// and 2 differ only in wt; the caller packs pm (pack_a_frags).
template <bool CAUSAL, typename W>
__device__ __forceinline__ void mask_cut(const float (&P)[32], float (&pm)[32], int r0, float scale,
                                         unsigned long long m, W&& wt) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  const int b0 = CAUSAL ? last_start(m, r0 + g) : next_start(m, r0 + g);
  const int b1 = CAUSAL ? last_start(m, r0 + g + 8) : next_start(m, r0 + g + 8);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = r0 + g + (r >> 1) * 8, col = 8 * j + 2 * tc + (r & 1), bound = (r >> 1) ? b1 : b0;
      const bool keep = CAUSAL ? (col <= row && col >= bound) : (col >= row && col < bound);
      pm[4 * j + r] = keep ? P[4 * j + r] * scale * wt(j, r, row, col) : 0.f;
    }
}

// mask_pack with the chunk's gate weights (mask_cut): w(row, col) (CAUSAL), else w(col, row). Factored, the weight
// (at most 1: nothing overflows, and a normal float wherever it matters next to flush-to-zero) comes first,
// then P scale times it.
template <typename T, bool CAUSAL>
__device__ __forceinline__ void mask_pack_gated(const float (&P)[32], uint32_t (&pa)[4][4], int r0, float scale,
                                                const GateTile& gt, unsigned long long m, bool fac) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  // the value of w's first argument t comes from ef (fac) or x (c2), of its second s from x
  const float* rowp = CAUSAL && fac ? gt.ef : gt.x;
  const float* colp = !CAUSAL && fac ? gt.ef : gt.x;
  const float rv0 = rowp[r0 + g], rv1 = rowp[r0 + g + 8];
  float2 cv[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) cv[j] = *reinterpret_cast<const float2*>(colp + 8 * j + 2 * tc);
  float pm[32];
  auto fill = [&](auto form) {
    mask_cut<CAUSAL>(P, pm, r0, scale, m, [&](int j, int r, int, int) {
      const float rv = (r >> 1) ? rv1 : rv0, c = (r & 1) ? cv[j].y : cv[j].x;
      return CAUSAL ? gate_weight(decltype(form)::value, rv, c) : gate_weight(decltype(form)::value, c, rv);
    });
  };
  if (fac) {
    fill(std::true_type{});
  } else {
    fill(std::false_type{});
  }
  pack_a_frags<T>(pm, pa);
}

// A chunk's document starts (AttnParams::g_resets: every log gate is 0 or -inf, and the decay is per head):
// bit i of m is set where token i of the chunk starts a document (its gate is -inf). The weights are then
// the powers of gamma (Gp[n] = gamma^n) cut at the starts, with no exp and no scan:
//   w(t, s) = Gp[t - s] where no start lies in (s, t], else 0;   pre(t) = Gp[t + 1] where none lies in [0, t].
struct ResetTile {
  unsigned long long m;
};

// The ResetTile of one chunk from one whole warp: lane l holds the log gates of tokens 2l, 2l + 1 (the bit
// logic: doc_starts.h).
__device__ __forceinline__ void reset_tile_build(ResetTile& rt, float x0, float x1) {
  const unsigned a = __ballot_sync(0xffffffffu, x0 == -INFINITY), b = __ballot_sync(0xffffffffu, x1 == -INFINITY);
  if ((threadIdx.x & 31) == 0) rt.m = starts_mask(a, b);
}

// The decay view of one chunk, as the main kernels read it, by gate mode GM (0: powers of gamma, 1: per-token
// gates, GateTile; 2: document starts, ResetTile): the weights w(t, s) (s <= t), pre(t), and the masked
// product packed as RS A fragments. `tile` is the chunk's tile in shared memory (unused for GM = 0); make a
// view with at() once the tile is complete (after the barrier that follows its build): GM = 2 reads the
// chunk's start mask into registers there, once, so that the weights are register arithmetic (a read of
// the tile in each weight would be repeated after every wgmma fence, which clobbers memory); GM = 1 reads
// its reset mask and whether the chunk is factored (a uniform branch between the two forms of its weights).
template <int GM>
struct ChunkView {
  const float* Gp;
  const void* tile;
  unsigned long long m;  // GM = 2: the chunk's start mask; GM = 1: its resets
  bool fac;              // GM = 1: the weights are factored (GateTile::fac)
  __device__ __forceinline__ static ChunkView at(const float* Gp, const void* tile) {
    unsigned long long m = 0;
    bool fac = false;
    if constexpr (GM == 2) m = static_cast<const ResetTile*>(tile)->m;
    if constexpr (GM == 1) {
      const GateTile* gt = static_cast<const GateTile*>(tile);
      m = gt->m;
      fac = gt->fac != 0;
    }
    return ChunkView{Gp, tile, m, fac};
  }
  __device__ __forceinline__ const GateTile& gates() const { return *static_cast<const GateTile*>(tile); }
  __device__ __forceinline__ float w(int t, int s) const {
    if constexpr (GM != 0) {
      if (last_start(m, t) > s) return 0.f;  // a reset / start in (s, t]
    }
    if constexpr (GM == 1) return gate_weight(fac, fac ? gates().ef[t] : gates().x[t], gates().x[s]);
    return Gp[t - s];
  }
  __device__ __forceinline__ float pre(int t) const {
    if constexpr (GM != 0) {
      if (last_start(m, t) >= 0) return 0.f;  // a reset / start in [0, t]
    }
    if constexpr (GM == 1) return gates().ef[t];
    return Gp[t + 1];
  }
  template <typename T, bool CAUSAL>
  __device__ __forceinline__ void pack(const float (&P)[32], uint32_t (&pa)[4][4], int r0, float scale) const {
    if constexpr (GM == 1) {
      mask_pack_gated<T, CAUSAL>(P, pa, r0, scale, gates(), m, fac);
    } else if constexpr (GM == 2) {
      const float* gp = Gp;  // the powers of gamma cut at the document starts
      float pm[32];
      mask_cut<CAUSAL>(P, pm, r0, scale, m,
                       [gp](int, int, int row, int col) { return gp[CAUSAL ? row - col : col - row]; });
      pack_a_frags<T>(pm, pa);
    } else {
      mask_pack<T, CAUSAL>(P, pa, r0, scale, Gp);
    }
  }
};

// The chunk's tile (GM 1 or 2) from one whole warp holding the log gates of tokens 2l, 2l + 1 in lane l.
template <int GM>
__device__ __forceinline__ void build_tile(void* tile, float x0, float x1) {
  if constexpr (GM == 1) gate_tile_scan(*static_cast<GateTile*>(tile), x0, x1);
  if constexpr (GM == 2) reset_tile_build(*static_cast<ResetTile*>(tile), x0, x1);
}

// The sum of x over the four threads of a row of an accumulator fragment (lanes 4g .. 4g + 3), in each of them.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// x[t] . acc[t] for this thread's rows t = r0 + g and r0 + g + 8 (d0, d1), acc NB 64-column accumulator
// blocks and x the 16-bit chunk tile at `tile` ([t][x] K-major: NB atoms of 64 columns, 128B-swizzled),
// summed over the four threads of each row (every one of them gets the sums).
template <typename T, int NB>
__device__ __forceinline__ void row_dots(const float (&acc)[NB][32], const unsigned char* tile, int r0, float& d0,
                                         float& d1) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  d0 = d1 = 0.f;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const uint32_t v = *reinterpret_cast<const uint32_t*>(tile + nb * kTileAtom + sw128_offset(r0 + g + 8 * hh, j) + 4 * tc);
        const float2 x = mma::unpack2<T>(v);
        const float s = x.x * acc[nb][4 * j + 2 * hh] + x.y * acc[nb][4 * j + 2 * hh + 1];
        if (hh == 0) {
          d0 += s;
        } else {
          d1 += s;
        }
      }
  d0 = quad_sum(d0);
  d1 = quad_sum(d1);
}

// a[t] . b[t] for this thread's rows t = r0 + g and r0 + g + 8 (d0, d1), a and b 16-bit chunk tiles as in
// row_dots (NB atoms of 64 columns), summed over the four threads of each row.
template <typename T, int NB>
__device__ __forceinline__ void row_dots_tiles(const unsigned char* ta, const unsigned char* tb, int r0, float& d0,
                                               float& d1) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  d0 = d1 = 0.f;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const uint32_t off = nb * kTileAtom + sw128_offset(r0 + g + 8 * hh, j) + 4 * tc;
        const float2 x = mma::unpack2<T>(*reinterpret_cast<const uint32_t*>(ta + off));
        const float2 y = mma::unpack2<T>(*reinterpret_cast<const uint32_t*>(tb + off));
        const float s = x.x * y.x + x.y * y.y;
        if (hh == 0) {
          d0 += s;
        } else {
          d1 += s;
        }
      }
  d0 = quad_sum(d0);
  d1 = quad_sum(d1);
}

// The diagonal of a masked 64 x 64 P as mask_pack / mask_pack_gated pack it (the weight of (t, t) is 1): the
// 16-bit value of scale * P[t][t] for this thread's rows t = r0 + g (d0) and r0 + g + 8 (d1), shared by the
// four threads of each row.
template <typename T>
__device__ __forceinline__ void diag_rounded(const float (&P)[32], int r0, float scale, float& d0, float& d1) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  d0 = d1 = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = r0 + g + (r >> 1) * 8, col = 8 * j + 2 * tc + (r & 1);
      if (row == col) {
        const float v = mma::unpack2<T>(mma::pack2<T>(P[4 * j + r] * scale, 0.f)).x;
        if (r >> 1) {
          d1 = v;
        } else {
          d0 = v;
        }
      }
    }
  d0 = quad_sum(d0);
  d1 = quad_sum(d1);
}

// One 64 x 64 fp32 accumulator block against a row-major fp32 matrix (leading dimension ld): this thread's
// element 4j + r is at row row0 + g + 8 (r >> 1), column col0 + 8j + 2tc + (r & 1), where row0 holds the
// warp's 16-row offset (acc_offset). load_acc: from src (zeros when src is null); store_acc_f32: to dst.
__device__ __forceinline__ size_t acc_offset(int j, int r, int ld, int row0, int col0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  return (size_t)(row0 + g + (r >> 1) * 8) * ld + col0 + 8 * j + 2 * tc + (r & 1);
}

__device__ __forceinline__ void load_acc(float (&d)[32], const float* src, int ld, int row0, int col0) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) d[4 * j + r] = src ? src[acc_offset(j, r, ld, row0, col0)] : 0.f;
}

__device__ __forceinline__ void store_acc_f32(const float (&d)[32], float* dst, int ld, int row0, int col0) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) dst[acc_offset(j, r, ld, row0, col0)] = d[4 * j + r];
}

// st *= gl, block by block, each pinned after (a state's decay over a chunk). It writes registers that
// wgmmas accumulate into: only with no wgmma group in flight (else the compiler waits for them first).
template <int N>
__device__ __forceinline__ void scale_state(float (&st)[N][32], float gl) {
#pragma unroll
  for (int nb = 0; nb < N; ++nb) {
#pragma unroll
    for (int r = 0; r < 32; ++r) st[nb][r] *= gl;
    fence_regs(st[nb]);
  }
}

// Zero an accumulator before the wgmmas that accumulate into it (fenced like any register access).
template <int R>
__device__ __forceinline__ void zero_acc(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) d[i] = 0.f;
  fence_regs(d);
}

template <typename T>
struct Kind;
template <>
struct Kind<__nv_bfloat16> {
  static constexpr bool bf16 = true;
};
template <>
struct Kind<__half> {
  static constexpr bool bf16 = false;
};

#define LASP_WG_D32                                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define LASP_WG_OUT32(d)                                                                                   \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),          \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),           \
      "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),           \
      "+f"(d[30]), "+f"(d[31])

// D(64 x 64) (+)= A(64 x 16) B(16 x 64), both from shared memory. TA / TB: 0 K-major, 1 MN-major.
// accumulate = 0 overwrites D.
template <typename T, int TA, int TB>
__device__ __forceinline__ void mma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int accumulate) {
#if LASP_WGMMA
  if constexpr (Kind<T>::bf16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " LASP_WG_D32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
        : LASP_WG_OUT32(d)
        : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " LASP_WG_D32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
        : LASP_WG_OUT32(d)
        : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB));
  }
#endif
}

// D(64 x 64) (+)= A(64 x 16, registers: the mma.sync A fragment of this warp's 16 rows) B(16 x 64, smem).
template <typename T, int TB>
__device__ __forceinline__ void mma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db, int accumulate) {
#if LASP_WGMMA
  if constexpr (Kind<T>::bf16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " LASP_WG_D32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : LASP_WG_OUT32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(TB));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " LASP_WG_D32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : LASP_WG_OUT32(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(TB));
  }
#endif
}

#undef LASP_WG_D32
#undef LASP_WG_OUT32

}  // namespace wg
}  // namespace cuda
}  // namespace lasp
