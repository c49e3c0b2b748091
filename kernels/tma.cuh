// Hopper tensor-memory-accelerator (TMA) helpers: host-side tensor maps over the (b, h, n, x) views of the
// tensor-core paths, and the device-side bulk tensor copies and mbarriers that use them (sm_90a).
//
// A map describes one (B, H, N, X) view with X contiguous as a 4-d tensor of dims (X, N, H, B) and boxes of
// 128 bytes of X (64 16-bit elements or 32 fp32: one swizzle atom row) by `rows` N-rows, 128-byte swizzle: a
// 16-bit box lands
// in shared memory exactly as wg::cp_async_tile lays out one 64-column atom (16-byte chunk c of row r at
// r * 128 + ((c ^ (r % 8)) * 16) from a 1024-byte aligned base). Rows past N read as zeros and are not
// written by stores, so the tile of a sequence's last, partial chunk needs no bounds code.
#pragma once
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <cstring>
#include <memory>

#include "lasp_params.h"
#include "wgmma.cuh"  // LASP_WGMMA (the sm_90a target, where TMA exists too), wg::kTileAtom

namespace lasp {
namespace cuda {
namespace tma {

// ---- host ----

// cuTensorMapEncodeTiled from the driver (through the runtime: no link against libcuda); null where the
// driver has none.
inline PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // leave no sticky error behind
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// Element types of a map: the 16-bit inputs (fp16, bf16; a bool `bf16` converts to these two) and fp32 (the
// backward's sums over shared heads, reduce_acc_rows_f32).
enum MapType : int { kMapF16 = 0, kMapBF16 = 1, kMapF32 = 2 };

// The map of view t (sizes B, H, N, X; elements of `type`) with boxes of 128 bytes of X by `rows`.
// Strides of size-1 dims are never used, so any valid value stands in for them. False where the driver
// refuses (the tensor-core paths only pass views with 16-byte aligned rows and nonzero strides).
inline bool encode_map(CUtensorMap* m, const TensorView4& t, int type, int64_t B, int64_t H, int64_t N, int64_t X,
                       int rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 enc = encode_fn();
  if (!enc || !t.ptr || t.stride[3] != 1) return false;
  const int64_t esz = type == kMapF32 ? 4 : 2;
  const cuuint64_t dims[4] = {(cuuint64_t)X, (cuuint64_t)N, (cuuint64_t)H, (cuuint64_t)B};
  const int64_t sizes[3] = {N, H, B};
  const int64_t el[3] = {t.stride[2], t.stride[1], t.stride[0]};
  cuuint64_t strides[3];
  for (int i = 0; i < 3; ++i) strides[i] = (cuuint64_t)((sizes[i] == 1 ? 8 * X : el[i]) * esz);
  const cuuint32_t box[4] = {(cuuint32_t)(128 / esz), (cuuint32_t)rows, 1, 1};
  const cuuint32_t estr[4] = {1, 1, 1, 1};
  const CUtensorMapDataType dt = type == kMapF32    ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                 : type == kMapBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                    : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r =
      enc(m, dt, 4, t.ptr, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// Everything encode_map reads, as plain words (no padding), so that equal keys compare equal bytewise.
struct MapKey {
  const void* ptr;
  int64_t size[4];    // B, H, N, X
  int64_t stride[3];  // of b, h, n (x is contiguous)
  int32_t rows, type;  // MapType
};

// The map is a pure function of its key, and an op call's views come back call after call (the caching
// allocator returns the same blocks), while an encode costs microseconds of host time before a launch. So
// each host thread keeps the maps it made in a small direct-mapped table (256 entries, allocated on first
// use); a hit copies the stored map, a miss encodes and replaces the entry.
inline bool make_map(CUtensorMap* m, const TensorView4& t, int type, int64_t B, int64_t H, int64_t N, int64_t X,
                     int rows) {
  struct Entry {
    MapKey key;
    CUtensorMap map;
    bool used;
  };
  constexpr size_t kSlots = 256;
  thread_local std::unique_ptr<Entry[]> table;
  MapKey key;
  std::memset(&key, 0, sizeof key);
  key.ptr = t.ptr;
  key.size[0] = B, key.size[1] = H, key.size[2] = N, key.size[3] = X;
  for (int i = 0; i < 3; ++i) key.stride[i] = t.stride[i];
  key.rows = rows;
  key.type = type;
  if (t.stride[3] != 1) return false;
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the key's words
  const uint64_t* w = reinterpret_cast<const uint64_t*>(&key);
  for (size_t i = 0; i < sizeof key / 8; ++i) h = (h ^ w[i]) * 1099511628211ull;
  if (!table) table.reset(new Entry[kSlots]());
  Entry& e = table[(h ^ (h >> 29)) % kSlots];
  if (e.used && std::memcmp(&e.key, &key, sizeof key) == 0) {
    *m = e.map;
    return true;
  }
  if (!encode_map(m, t, type, B, H, N, X, rows)) return false;
  e.key = key;
  e.map = *m;
  e.used = true;
  return true;
}
static_assert(sizeof(MapKey) == 72, "MapKey must have no padding (it is compared bytewise)");

// ---- device (sm_90a; other targets never run the kernels that call these) ----

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if LASP_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes the barriers' initialisation visible to the async proxy (before the block barrier that follows).
__device__ __forceinline__ void fence_mbar_init() {
#if LASP_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// The producer's arrival: the phase completes once `bytes` more bytes have landed.
__device__ __forceinline__ void arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if LASP_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// Wait until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void wait(uint32_t bar, uint32_t parity) {
#if LASP_WGMMA
  asm volatile(
      "{\n.reg .pred P1;\nLASP_TMA_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra LASP_TMA_DONE;\nbra LASP_TMA_WAIT;\nLASP_TMA_DONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}
// Thread 0 of the block: `count` mbarriers at bar, bar + 8, ... (one arrival each), visible to the async
// proxy once the block barrier that must follow has passed.
__device__ __forceinline__ void init_barriers(uint32_t bar, int count) {
  for (int i = 0; i < count; ++i) mbar_init(bar + 8u * (uint32_t)i, 1);
  fence_mbar_init();
}
// Box (x0, n0) of head h, batch b into shared memory at dst (1024-byte aligned), completing on bar.
__device__ __forceinline__ void load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int x0, int n0, int h, int b) {
#if LASP_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x0), "r"(n0), "r"(h), "r"(b), "r"(bar)
      : "memory");
#endif
}
// `atoms` boxes side by side, columns x0 + 64 i of the rows from n0, into the consecutive swizzle atoms
// dst + i * wg::kTileAtom: a 64-row tile of 64 * atoms columns as the wgmma operands read it.
__device__ __forceinline__ void load_atoms(uint32_t dst, const CUtensorMap* map, uint32_t bar, int atoms, int x0,
                                           int n0, int h, int b) {
#pragma unroll
  for (int i = 0; i < atoms; ++i) load(dst + (uint32_t)i * wg::kTileAtom, map, bar, x0 + 64 * i, n0, h, b);
}
// Shared memory at src (1024-byte aligned, written by this thread's block and fenced with
// wg::fence_async_smem) to box (x0, n0) of head h, batch b; rows past N are dropped.
__device__ __forceinline__ void store(const CUtensorMap* map, uint32_t src, int x0, int n0, int h, int b) {
#if LASP_WGMMA
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(x0), "r"(n0), "r"(h), "r"(b)
               : "memory");
#endif
}
// The same box added elementwise to what global memory holds (fp32 maps: the add happens in L2, atomically per
// element, in no fixed order among the blocks that add to one box).
__device__ __forceinline__ void reduce_add(const CUtensorMap* map, uint32_t src, int x0, int n0, int h, int b) {
#if LASP_WGMMA
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(x0), "r"(n0), "r"(h), "r"(b)
      : "memory");
#endif
}
__device__ __forceinline__ void store_commit() {
#if LASP_WGMMA
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// All but the newest `pending` of this thread's committed stores have read their shared memory (it may
// be rewritten).
template <int pending = 0>
__device__ __forceinline__ void store_wait_read() {
#if LASP_WGMMA
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(pending) : "memory");
#endif
}
// This thread's committed stores are complete.
__device__ __forceinline__ void store_wait_all() {
#if LASP_WGMMA
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void prefetch_map(const CUtensorMap* map) {
#if LASP_WGMMA
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}

// One box of this warp's 16 rows r0.. through the next of its warpgroup's NSTG staging atoms from `stg` (a
// byte offset from the 1024-aligned shared base, `sm` as a pointer, `base` as an address): lane 0 first waits
// until the store that last read the atom has read it, fill(atom) writes the warp's rows of it (swizzled, so
// the fragment stores are free of bank conflicts), then lane 0 stores the box (x0, row0) of head h, batch b
// (RED: adds it, reduce_add); rows past N are dropped. `cnt` counts this warp's boxes (the atoms are used in
// turn). Warps whose rows all lie past the chunk's end (len) store nothing.
template <int NSTG, bool RED, typename Fill>
__device__ __forceinline__ void stage_box(const CUtensorMap* map, uint32_t base, uint32_t stg, int& cnt, int r0,
                                          int len, int x0, int row0, int h, int b, Fill&& fill) {
  const int lane = threadIdx.x & 31;
  const uint32_t atom = stg + (uint32_t)(cnt % NSTG) * wg::kTileAtom;
  if (lane == 0) store_wait_read<NSTG - 1>();
  __syncwarp();
  fill(atom);
  wg::fence_async_smem();
  __syncwarp();
  if (r0 < len) {
    if (lane == 0) {
      if constexpr (RED) {
        reduce_add(map, base + atom + (uint32_t)r0 * 128u, x0, row0, h, b);
      } else {
        store(map, base + atom + (uint32_t)r0 * 128u, x0, row0, h, b);
      }
      store_commit();
    }
    ++cnt;
  }
}

// A 16-bit 64 x 64 output block (a warpgroup's wgmma accumulator) by TMA: this warp's 16 rows as one box
// (x0, row0 = the chunk's first row + r0) of a 16-bit map, through a staging atom (stage_box).
template <typename T, int NSTG>
__device__ __forceinline__ void store_acc_rows(const float (&d)[32], const CUtensorMap* map, unsigned char* sm,
                                               uint32_t base, uint32_t stg, int& cnt, int r0, int len, int x0, int row0,
                                               int h, int b) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
  stage_box<NSTG, false>(map, base, stg, cnt, r0, len, x0, row0, h, b, [&](uint32_t atom) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int j = 0; j < 8; ++j)
        *reinterpret_cast<uint32_t*>(sm + atom + wg::sw128_offset(r0 + g + 8 * hh, j) + 4 * tc) =
            mma::pack2<T>(d[4 * j + 2 * hh], d[4 * j + 2 * hh + 1]);
  });
}

// The fp32 form for sums over shared heads: this warp's 16 rows of a 64 x 64 fp32 accumulator added into boxes
// (x0, row0) and (x0 + 32, row0) of an fp32 map (boxes of 32 x 16), each 32-column half through its own
// staging atom (16 rows x 128 B, swizzled alike), so a call takes two atoms' turns.
template <int NSTG>
__device__ __forceinline__ void reduce_acc_rows_f32(const float (&d)[32], const CUtensorMap* map, unsigned char* sm,
                                                    uint32_t base, uint32_t stg, int& cnt, int r0, int len, int x0,
                                                    int row0, int h, int b) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tc = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    stage_box<NSTG, true>(map, base, stg, cnt, r0, len, x0 + 32 * half, row0, h, b, [&](uint32_t atom) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int j = 0; j < 4; ++j)  // columns 8j + 2tc, + 1 of this half: 16-byte chunk 2j + tc / 2
          *reinterpret_cast<float2*>(sm + atom + wg::sw128_offset(r0 + g + 8 * hh, 2 * j + (tc >> 1)) + 8 * (tc & 1)) =
              make_float2(d[4 * (4 * half + j) + 2 * hh], d[4 * (4 * half + j) + 2 * hh + 1]);
    });
  }
}

}  // namespace tma
}  // namespace cuda
}  // namespace lasp
