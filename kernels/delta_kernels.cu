// The gated delta rule's CUDA kernels: the chain of states (delta_chain.h's block program, one block per
// (b, h) and tile of 32 state columns, the tiles of one (b, h) consecutive), the chunks' unit-triangular
// solves (delta_solve.h's, one block of 128 threads per chunk and tile of 128 columns), the chunks' fused WY
// quantities (delta_prep.h's), the forward's output (delta_out.h's), the backward's chain inputs, its
// transposed solve with m^-1 and its gradients (delta_bwd.h's), each one block of 256 threads per chunk.
#include <cuda_runtime.h>

#include "delta_chain_api.h"
#include "mma.cuh"
#include "mma_tiles.cuh"  // store_frag

namespace lasp {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kChainThreads) chain_kernel(ChainArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  // (b, h)-major: the column tiles of one (b, h) run side by side and share its Bm and Cm through L2
  const int tiles = (a.W + kChainCols - 1) / kChainCols;
  chain_block<T>(a, static_cast<int64_t>(blockIdx.x / tiles), static_cast<int>(blockIdx.x % tiles),
                 reinterpret_cast<T*>(smem_raw), ex);
}

template <typename T>
__global__ void __launch_bounds__(kSolveCols) solve_kernel(SolveArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  solve_block<T>(a, static_cast<int64_t>(blockIdx.x), static_cast<int>(blockIdx.y), reinterpret_cast<T*>(smem_raw), ex,
                 kSolveCols);
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads) prep_kernel(PrepArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  prep_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

template <typename T>
__global__ void __launch_bounds__(kOutThreads, sizeof(T) == 4 ? 2 : 1) out_kernel(OutArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  out_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_kernel(BwdArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  bwd_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) dr_kernel(DrArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  dr_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads) pro_kernel(ProArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  pro_block<T>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<T*>(smem_raw), ex);
}

__global__ void __launch_bounds__(kOutThreads) out_tc_kernel(OutArgs<float> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  out_tc_block(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<float*>(smem_raw), ex);
}

__global__ void __launch_bounds__(kBwdThreads) bwd_tc_kernel(BwdArgs<float> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  bwd_tc_block(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<float*>(smem_raw), ex);
}

__global__ void __launch_bounds__(kBwdThreads) pro_tc_kernel(ProArgs<float> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  pro_tc_block(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<float*>(smem_raw), ex);
}

__global__ void __launch_bounds__(kBwdThreads) dr_tc_kernel(DrArgs<float> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  dr_tc_block(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<float*>(smem_raw), ex);
}

__global__ void __launch_bounds__(kPrepThreads) prep_tc_kernel(PrepArgs<float> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  prep_block<float, DeviceExec, true>(a, static_cast<int64_t>(blockIdx.x), reinterpret_cast<float*>(smem_raw), ex);
}

// One block per chunk ch = (b H + h) nc + c (delta_wy16.h).
template <typename T16>
__global__ void __launch_bounds__(kPrepThreads) wy16_kernel(Wy16Args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DeviceExec ex;
  const int64_t ch = blockIdx.x;
  prep_block<float, DeviceExec, true, Wy16Io<T16>>(wy16_io<T16>(a, ch), ch, reinterpret_cast<float*>(smem_raw), ex);
}

// The WY form in 16 bits on 16-bit mma.sync (m16n8k16, fp32 accumulation), one block of 256 threads per chunk
// ch = (b H + h) nc + c, for rows on 16-byte boundaries and D, E multiples of 16 (wy16_mma_takes):
//   1. K, V (C = 64 rows, zeros past N) by cp.async into 16-bit tiles (rows of D + 8, E + 8: odd multiples of 16
//      bytes, so ldmatrix is conflict-free), beta and g;
//   2. gam (fp32) and pre as prep_block forms them (column parts, the gates added in order);
//   3. A = strictly lower part of diag(beta) (gam * K K^T), K K^T on tensor cores (six warps: the tiles on and
//      below the diagonal);
//   4. m^-1 (invert_unit_lower64: fp32, in blocks of 16, the off-diagonal blocks on tf32 tensor cores in three
//      passes);
//   5. m^-1 in 16 bits (over A's tile; out to minv where asked), V's rows scaled by beta and K's by beta pre in
//      place (16 bits);
//   6. W_v = m^-1 (diag(beta) V), W_k = m^-1 (diag(beta pre) K) on tensor cores over the columns left of each row
//      tile's end (m^-1 is lower triangular), stored as bf16 / fp16 pairs.
// With minv_in (the backward), a kernel of its own (GIVEN): m^-1 in 16 bits comes by cp.async with K and V
// (identity rows past N), gam is not formed (pre alone, with gate_parts' bits: gate_pre) and steps 3 and 4 are
// skipped: the same operands as the forward's, so the same W. 16-bit operands where prep_block's tensor-core
// program has tf32 ones (as fla's WY kernels round them); shared memory about 70 KiB at D = E = 128, three blocks
// per SM (GIVEN: about 44 KiB without the fp32 tiles, four blocks).
constexpr int kWyC = 64, kWyLdc = 68, kWyLdm = 72;  // fp32 rows of A, gam, m^-1; 16-bit rows of M
struct Wy16MmaLayout {
  int ldk, ldv;
  size_t k, v, a, gt, b, g, pre, bytes;  // byte offsets; given: a is M's 16-bit tile, gt unused
  __host__ __device__ Wy16MmaLayout(int D, int E, int T16size, bool given) {
    ldk = D + 8, ldv = E + 8;
    k = 0;
    v = k + (size_t)kWyC * ldk * T16size;
    a = v + (size_t)kWyC * ldv * T16size;
    gt = given ? a + (size_t)kWyC * kWyLdm * T16size : a + (size_t)kWyC * kWyLdc * 4;
    b = given ? gt : gt + (size_t)kWyC * kWyLdc * 4;
    g = b + kWyC * 4;
    pre = g + kWyC * 4;
    bytes = pre + kWyC * 4;
  }
};

template <typename T16, bool GIVEN>
__global__ void __launch_bounds__(kPrepThreads, GIVEN ? 4 : 3) wy16_mma_kernel(Wy16Args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Wy16Io<T16> io = wy16_io<T16>(a, blockIdx.x);
  const int D = a.D, E = a.E, rows = io.rows, t = threadIdx.x, w = t >> 5;
  const Wy16MmaLayout L(D, E, sizeof(T16), GIVEN);
  T16* sK = reinterpret_cast<T16*>(smem_raw + L.k);
  T16* sV = reinterpret_cast<T16*>(smem_raw + L.v);
  float* sA = reinterpret_cast<float*>(smem_raw + L.a);
  T16* sM = reinterpret_cast<T16*>(smem_raw + L.a);  // step 5 on (GIVEN: from the start): m^-1, rows of kWyLdm
  float* sGT = reinterpret_cast<float*>(smem_raw + L.gt);
  float* sb = reinterpret_cast<float*>(smem_raw + L.b);
  float* sg = reinterpret_cast<float*>(smem_raw + L.g);
  float* spre = reinterpret_cast<float*>(smem_raw + L.pre);
  // 1.
  {
    mma::cp_rows(sK, L.ldk, io.k, io.ks, rows, kWyC, D, t, kPrepThreads);
    mma::cp_rows(sV, L.ldv, io.v, io.vs, rows, kWyC, E, t, kPrepThreads);
    if constexpr (GIVEN) mma::cp_rows(sM, kWyLdm, io.minv16_in, kWyC, rows, kWyC, kWyC, t, kPrepThreads);
    mma::cp_async_commit();
    if (t < kWyC) {
      sb[t] = t < rows ? io.beta[t] : 0.f;
      sg[t] = t < rows ? io.g[t] : 0.f;
    }
    mma::cp_async_wait<0>();
    __syncthreads();
  }
  if constexpr (GIVEN) {
    if (t < kWyC && t >= rows) sM[t * kWyLdm + t] = static_cast<T16>(1.f);  // m's rows past N: identity
    gate_pre<float>(t, kWyC, sg, [&](int i, float p) { spre[i] = p; });     // 2. pre alone
    __syncthreads();
  } else {
    gate_parts<float>(  // 2. as prep_block's step 2
        t, kPrepThreads, kWyC, sg, true, [&](int i, int j, float x) { sGT[i * kWyLdc + j] = x; },
        [&](int i, float p) { spre[i] = p; });
    __syncthreads();
    wy_a16(sK, L.ldk, D, sb, sGT, sA, kWyLdc);  // 3.
    __syncthreads();
    invert_unit_lower64(sA, sGT, kWyLdc);  // 4. (ends with a barrier)
    // 5.
    for (int e = t; e < kWyC * kWyC / 8; e += kPrepThreads) {  // 8 entries (16 bytes) of a row at a time
      const int i = e / (kWyC / 8), j0 = (e % (kWyC / 8)) * 8;
      uint4 u;
      uint32_t* x = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        const float lo = j0 + j <= i ? sGT[i * kWyLdc + j0 + j] : 0.f;
        const float hi = j0 + j + 1 <= i ? sGT[i * kWyLdc + j0 + j + 1] : 0.f;
        x[j / 2] = mma::pack2<T16>(lo, hi);
      }
      *reinterpret_cast<uint4*>(sM + i * kWyLdm + j0) = u;
      if (io.minv16 && i < rows) *reinterpret_cast<uint4*>(io.minv16 + i * kWyC + j0) = u;
    }
  }
  // rows of K times beta pre, of V times beta, in place, 8 entries (16 bytes) at a time
  auto scale_rows = [&](T16* s, int ld, int cols, bool with_pre) {
    const int per = cols / 8;
    for (int e = t; e < kWyC * per; e += kPrepThreads) {
      const int i = e / per;
      const float f = with_pre ? sb[i] * spre[i] : sb[i];
      uint4* p = reinterpret_cast<uint4*>(s + i * ld + (e - i * per) * 8);
      uint4 u = *p;
      uint32_t* x = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 y = mma::unpack2<T16>(x[j]);
        x[j] = mma::pack2<T16>(y.x * f, y.y * f);
      }
      *p = u;
    }
  };
  scale_rows(sK, L.ldk, D, true);
  scale_rows(sV, L.ldv, E, false);
  __syncthreads();
  // 6. jobs: (row tile, 64 columns) of W_v, then of W_k
  const int vt = (E + 63) / 64, kt = (D + 63) / 64;
  for (int job = w; job < 4 * (vt + kt); job += kPrepThreads / 32) {
    const int rt = job % 4, ct = job / 4, m0 = rt * 16;
    const bool isv = ct < vt;
    const T16* sB = isv ? sV : sK;
    const int ldb = isv ? L.ldv : L.ldk, cols = isv ? E : D, n0 = (isv ? ct : ct - vt) * 64;
    float acc[8][4] = {};
    for (int k0 = 0; k0 <= m0; k0 += 16) {
      uint32_t af[4], bf[4];
      mma::load_a(af, sM, kWyLdm, m0, k0);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (n0 + 16 * np >= cols) break;
        mma::load_b_kn(bf, sB, ldb, k0, n0 + 16 * np);
        mma::mma16816<T16>(acc[2 * np], af, bf[0], bf[1]);
        mma::mma16816<T16>(acc[2 * np + 1], af, bf[2], bf[3]);
      }
    }
    mma::store_frag<T16, 8>(acc, isv ? io.wv : io.wk, cols, m0, n0, rows, cols);
  }
}

// y = x / sqrt(sum of x^2 over the row + 1e-6) per row (b, h, n) of D (a power of two, 8..256) contiguous 16-bit
// entries, each tensor's rows at its own strides, in fp32, rounded once, and r = 1 / sqrt(...) where a.r: D / 8
// threads per row (8 entries, one 16-byte load each), a shuffle sum over them. With dy (BWD): its gradient
// instead, from the forward's y (in x) and r, dx = r (dy - y sum(dy y)).
template <typename T16, bool BWD>
__global__ void __launch_bounds__(256) l2norm16_kernel(L2NormRows a) {
  const int D = a.D, tpr = D / 8;
  const int64_t i = (int64_t)blockIdx.x * (256 / tpr) + threadIdx.x / tpr, rows = a.B * a.H * a.N;
  const int part = threadIdx.x % tpr;
  const int64_t n = i % a.N, bh = i / a.N, h = bh % a.H, b = bh / a.H;
  auto at = [&](const int64_t* st) { return b * st[0] + h * st[1] + n * st[2]; };
  struct alignas(16) Raw {
    uint32_t w[4];
  };
  Raw r = Raw{{0u, 0u, 0u, 0u}}, d = r;
  float rn = 0.f;
  if (i < rows) {
    r = *reinterpret_cast<const Raw*>(static_cast<const T16*>(a.x) + at(a.xs) + part * 8);
    if constexpr (BWD) {
      d = *reinterpret_cast<const Raw*>(static_cast<const T16*>(a.dy) + at(a.dys) + part * 8);
      rn = a.r[at(a.rs)];
    }
  }
  float f[8], ss = 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const float2 u = mma::unpack2<T16>(r.w[c]);
    f[2 * c] = u.x, f[2 * c + 1] = u.y;
    if constexpr (!BWD) ss += u.x * u.x + u.y * u.y;
  }
  if constexpr (BWD) {
    float g[8], dot = 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float2 u = mma::unpack2<T16>(d.w[c]);
      g[2 * c] = u.x, g[2 * c + 1] = u.y;
      dot += u.x * f[2 * c] + u.y * f[2 * c + 1];
    }
    for (int o = tpr / 2; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);  // sum(dy y)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      r.w[c] = mma::pack2<T16>(rn * (g[2 * c] - f[2 * c] * dot), rn * (g[2 * c + 1] - f[2 * c + 1] * dot));
  } else {
    for (int o = tpr / 2; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float s = rsqrtf(ss + 1e-6f);
#pragma unroll
    for (int c = 0; c < 4; ++c) r.w[c] = mma::pack2<T16>(f[2 * c] * s, f[2 * c + 1] * s);
    if (a.r && i < rows && part == 0) a.r[at(a.rs)] = s;
  }
  if (i < rows) *reinterpret_cast<Raw*>(static_cast<T16*>(a.y) + at(a.ys) + part * 8) = r;
}

// Whether the device is sm_80 or later (tf32 mma.sync); an error of the query in *e.
bool tf32_device(cudaError_t* e) {
  int dev = 0, major = 0;
  *e = cudaGetDevice(&dev);
  if (*e == cudaSuccess) *e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return *e == cudaSuccess && major >= 8;
}

// Launches kernel<<<grid, threads, smem, st>>>(args), opting in to more than 48 KiB of shared memory first.
template <typename A>
cudaError_t launch(void (*kernel)(A), dim3 grid, int threads, size_t smem, cudaStream_t st, const A& args) {
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, threads, smem, st>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_chain(const ChainArgs<T>& a, cudaStream_t st) {
  const int64_t tiles = (a.W + kChainCols - 1) / kChainCols;
  if (a.BH < 1 || a.C < 1 || a.D < 1 || a.W < 1 || a.nc < 0 || a.BH * tiles > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid((unsigned)(a.BH * tiles));
  return launch(chain_kernel<T>, grid, kChainThreads, chain_smem_bytes<T>(a.C, a.D), st, a);
}

template <typename T>
cudaError_t run_solve(const SolveArgs<T>& a, cudaStream_t st) {
  if (a.chunks < 0 || a.C < 1 || a.W < 1 || a.chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.chunks == 0) return cudaSuccess;
  const dim3 grid((unsigned)a.chunks, (unsigned)((a.W + kSolveCols - 1) / kSolveCols));
  return launch(solve_kernel<T>, grid, kSolveCols, solve_smem_bytes<T>(a.C), st, a);
}

// try_tc and run_per_chunk launch every program with 256 threads, the count each program's tiles assume:
static_assert(kPrepThreads == 256 && kOutThreads == 256 && kBwdThreads == 256,
              "the per-chunk launches use 256 threads per block");

// The tensor-core form of a per-chunk program where asked (a.tensor_cores), C is a multiple of 16, its shared
// memory fits and the device has tf32 mma.sync (sm_80+): launches it and sets *done; else leaves the SIMT form.
template <typename A>
cudaError_t try_tc(void (*kernel)(A), const A& a, size_t smem, cudaStream_t st, bool* done) {
  *done = false;
  if (!a.tensor_cores || a.C % 16 != 0 || smem > 227 * 1024 || a.chunks < 0 || a.chunks > INT32_MAX) return cudaSuccess;
  cudaError_t e;
  if (!tf32_device(&e)) return e;
  *done = true;
  if (a.chunks == 0) return cudaSuccess;
  return launch(kernel, dim3((unsigned)a.chunks), 256, smem, st, a);
}

// A per-chunk program's kernel: one block of 256 threads per chunk, where `takes` (its sizes fit).
template <typename A>
cudaError_t run_per_chunk(void (*kernel)(A), const A& a, bool takes, size_t smem, cudaStream_t st) {
  if (!takes || a.chunks < 0 || a.chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.chunks == 0) return cudaSuccess;
  return launch(kernel, dim3((unsigned)a.chunks), 256, smem, st, a);
}

// Whether a per-chunk program takes C, D, E with `elems` elements of elem_size bytes of shared memory.
bool per_chunk_takes(int C, int D, int E, size_t elems, size_t elem_size) {
  return C >= 1 && C <= 64 && D >= 1 && E >= 1 && elems * elem_size <= 227 * 1024;
}

}  // namespace

bool delta_pro_takes(int C, int D, int E, size_t elem_size) {
  return per_chunk_takes(C, D, E, ProLayout(C, D).elems, elem_size);
}

cudaError_t delta_pro(const ProArgs<float>& a, cudaStream_t st) {
  bool done;
  const cudaError_t e = try_tc(pro_tc_kernel, a, pro_tc_smem_bytes(a.C, a.D), st, &done);
  if (done || e != cudaSuccess) return e;
  return run_per_chunk(pro_kernel<float>, a, delta_pro_takes(a.C, a.D, a.E, sizeof(float)),
                       pro_smem_bytes<float>(a.C, a.D), st);
}
cudaError_t delta_pro(const ProArgs<double>& a, cudaStream_t st) {
  return run_per_chunk(pro_kernel<double>, a, delta_pro_takes(a.C, a.D, a.E, sizeof(double)),
                       pro_smem_bytes<double>(a.C, a.D), st);
}

bool delta_dr_takes(int C, int D, int E, size_t elem_size) {
  return per_chunk_takes(C, D, E, DrLayout(C, D, E).elems, elem_size);
}

cudaError_t delta_dr(const DrArgs<float>& a, cudaStream_t st) {
  bool done;
  const cudaError_t e = try_tc(dr_tc_kernel, a, dr_tc_smem_bytes(a.C, a.D, a.E), st, &done);
  if (done || e != cudaSuccess) return e;
  return run_per_chunk(dr_kernel<float>, a, delta_dr_takes(a.C, a.D, a.E, sizeof(float)),
                       dr_smem_bytes<float>(a.C, a.D, a.E), st);
}
cudaError_t delta_dr(const DrArgs<double>& a, cudaStream_t st) {
  return run_per_chunk(dr_kernel<double>, a, delta_dr_takes(a.C, a.D, a.E, sizeof(double)),
                       dr_smem_bytes<double>(a.C, a.D, a.E), st);
}

bool delta_bwd_takes(int C, int D, int E, size_t elem_size) {
  return per_chunk_takes(C, D, E, BwdLayout(C, D, E).elems, elem_size);
}

cudaError_t delta_bwd(const BwdArgs<float>& a, cudaStream_t st) {
  bool done;
  const cudaError_t e = try_tc(bwd_tc_kernel, a, bwd_tc_smem_bytes(a.C, a.D, a.E), st, &done);
  if (done || e != cudaSuccess) return e;
  return run_per_chunk(bwd_kernel<float>, a, delta_bwd_takes(a.C, a.D, a.E, sizeof(float)),
                       bwd_smem_bytes<float>(a.C, a.D, a.E), st);
}
cudaError_t delta_bwd(const BwdArgs<double>& a, cudaStream_t st) {
  return run_per_chunk(bwd_kernel<double>, a, delta_bwd_takes(a.C, a.D, a.E, sizeof(double)),
                       bwd_smem_bytes<double>(a.C, a.D, a.E), st);
}

bool delta_out_takes(int C, int D, int E, size_t elem_size) {
  return per_chunk_takes(C, D, E, OutLayout(C, D).elems, elem_size);
}

cudaError_t delta_out(const OutArgs<float>& a, cudaStream_t st) {
  bool done;
  const cudaError_t e = try_tc(out_tc_kernel, a, out_tc_smem_bytes(a.C, a.D), st, &done);
  if (done || e != cudaSuccess) return e;
  return run_per_chunk(out_kernel<float>, a, delta_out_takes(a.C, a.D, a.E, sizeof(float)),
                       out_smem_bytes<float>(a.C, a.D), st);
}
cudaError_t delta_out(const OutArgs<double>& a, cudaStream_t st) {
  return run_per_chunk(out_kernel<double>, a, delta_out_takes(a.C, a.D, a.E, sizeof(double)),
                       out_smem_bytes<double>(a.C, a.D), st);
}

bool delta_prep_takes(int C, int D, int E, size_t elem_size) {
  return per_chunk_takes(C, D, E, PrepLayout(C, D, E).elems, elem_size);
}

cudaError_t delta_prep(const PrepArgs<float>& a, cudaStream_t st) {
  bool done;
  const cudaError_t e = try_tc(prep_tc_kernel, a, prep_tc_smem_bytes(a.C, a.D, a.E), st, &done);
  if (done || e != cudaSuccess) return e;
  return run_per_chunk(prep_kernel<float>, a, delta_prep_takes(a.C, a.D, a.E, sizeof(float)),
                       prep_smem_bytes<float>(a.C, a.D, a.E), st);
}
cudaError_t delta_prep(const PrepArgs<double>& a, cudaStream_t st) {
  return run_per_chunk(prep_kernel<double>, a, delta_prep_takes(a.C, a.D, a.E, sizeof(double)),
                       prep_smem_bytes<double>(a.C, a.D, a.E), st);
}
bool wy16_mma_takes(const Wy16Args& a);

bool delta_wy16_takes(const Wy16Args& a) {
  if ((a.minv || a.minv_in) && (a.program_only || !wy16_mma_takes(a))) return false;
  return a.C == 64 && a.D >= 8 && a.D <= 128 && a.D % 8 == 0 && a.E >= 8 && a.E <= 128 && a.E % 8 == 0 && a.B >= 0 &&
         a.H >= 1 && a.N >= 0 && a.kgroup >= 1 && a.vgroup >= 1 && a.B * a.H * ((a.N + a.C - 1) / a.C) <= INT32_MAX;
}

namespace {
template <bool BWD>
cudaError_t l2norm16(const L2NormRows& a, cudaStream_t st) {
  const int64_t rows = a.B * a.H * a.N;
  if (a.B < 0 || a.H < 1 || a.N < 0 || a.D < 8 || a.D > 256 || (a.D & (a.D - 1)) != 0 ||
      !mma::rows_on_16_bytes(a.x, a.xs) || !mma::rows_on_16_bytes(a.y, a.ys) ||
      (BWD && (!mma::rows_on_16_bytes(a.dy, a.dys) || !a.r)))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int64_t per_block = 256 / (a.D / 8), blocks = (rows + per_block - 1) / per_block;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  if (a.bf16) {
    l2norm16_kernel<__nv_bfloat16, BWD><<<(unsigned)blocks, 256, 0, st>>>(a);
  } else {
    l2norm16_kernel<__half, BWD><<<(unsigned)blocks, 256, 0, st>>>(a);
  }
  return cudaGetLastError();
}
}  // namespace

cudaError_t delta_l2norm16(const L2NormRows& a, cudaStream_t st) { return l2norm16<false>(a, st); }

cudaError_t delta_l2norm16_bwd(const L2NormRows& a, cudaStream_t st) { return l2norm16<true>(a, st); }

bool wy16_mma_takes(const Wy16Args& a) {
  return a.D % 16 == 0 && a.E % 16 == 0 && mma::rows_on_16_bytes(a.k, a.ks) && mma::rows_on_16_bytes(a.v, a.vs) &&
         reinterpret_cast<uintptr_t>(a.wv) % 4 == 0 && reinterpret_cast<uintptr_t>(a.wk) % 4 == 0 &&
         reinterpret_cast<uintptr_t>(a.minv) % 16 == 0 && reinterpret_cast<uintptr_t>(a.minv_in) % 16 == 0;
}

cudaError_t delta_wy16(const Wy16Args& a, cudaStream_t st) {
  if (!delta_wy16_takes(a)) return cudaErrorInvalidValue;
  cudaError_t e;
  if (!tf32_device(&e)) return e != cudaSuccess ? e : cudaErrorInvalidDeviceFunction;
  const int64_t nc = (a.N + a.C - 1) / a.C, chunks = a.B * a.H * nc;
  if (chunks == 0) return cudaSuccess;
  if (!a.program_only && wy16_mma_takes(a)) {
    const bool given = a.minv_in != nullptr;
    const size_t smem = Wy16MmaLayout(a.D, a.E, 2, given).bytes;
    const dim3 grid((unsigned)chunks);
    if (given) {  // four blocks per SM: shared memory over the L1 cache (44 KiB each at D = E = 128)
      const auto carve = [](auto kernel) {
        return cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                    (int)cudaSharedmemCarveoutMaxShared);
      };
      const cudaError_t ce =
          a.bf16 ? carve(wy16_mma_kernel<__nv_bfloat16, true>) : carve(wy16_mma_kernel<__half, true>);
      if (ce != cudaSuccess) return ce;
      return a.bf16 ? launch(wy16_mma_kernel<__nv_bfloat16, true>, grid, kPrepThreads, smem, st, a)
                    : launch(wy16_mma_kernel<__half, true>, grid, kPrepThreads, smem, st, a);
    }
    return a.bf16 ? launch(wy16_mma_kernel<__nv_bfloat16, false>, grid, kPrepThreads, smem, st, a)
                  : launch(wy16_mma_kernel<__half, false>, grid, kPrepThreads, smem, st, a);
  }
  const size_t smem = prep_tc_smem_bytes(a.C, a.D, a.E);
  return a.bf16 ? launch(wy16_kernel<__nv_bfloat16>, dim3((unsigned)chunks), kPrepThreads, smem, st, a)
                : launch(wy16_kernel<__half>, dim3((unsigned)chunks), kPrepThreads, smem, st, a);
}

cudaError_t delta_chain(const ChainArgs<float>& a, cudaStream_t st) { return run_chain(a, st); }
cudaError_t delta_chain(const ChainArgs<double>& a, cudaStream_t st) { return run_chain(a, st); }
cudaError_t delta_solve(const SolveArgs<float>& a, cudaStream_t st) { return run_solve(a, st); }
cudaError_t delta_solve(const SolveArgs<double>& a, cudaStream_t st) { return run_solve(a, st); }

}  // namespace cuda
}  // namespace lasp
