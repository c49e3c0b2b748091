// The gated delta rule's CUDA kernels: the chain of states (delta_chain.h's block program, one block per
// (b, h) and tile of 32 state columns, the tiles of one (b, h) consecutive), the chunks' unit-triangular
// solves (delta_solve.h's, one block of 128 threads per chunk and tile of 128 columns), the chunks' fused WY
// quantities (delta_prep.h's), the forward's output (delta_out.h's), the backward's chain inputs, its
// transposed solve with m^-1 and its gradients (delta_bwd.h's), each one block of 256 threads per chunk.
#include <cuda_runtime.h>

#include "delta_chain_api.h"

namespace lasp {
namespace cuda {
namespace {

// The block programs' executor on the device: each thread runs its own part of a phase.
struct DeviceExec {
  template <typename F>
  __device__ __forceinline__ void threads(F f) {
    f(static_cast<int>(threadIdx.x));
  }
  template <typename F>
  __device__ __forceinline__ void warps(F f) {  // every thread of warp w: f(w) (warp_tile.h)
    f(static_cast<int>(threadIdx.x >> 5));
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
  __device__ __forceinline__ void done() {}
};

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
bool delta_wy16_takes(const Wy16Args& a) {
  return a.C == 64 && a.D >= 8 && a.D <= 128 && a.D % 8 == 0 && a.E >= 8 && a.E <= 128 && a.E % 8 == 0 && a.B >= 0 &&
         a.H >= 1 && a.N >= 0 && a.kgroup >= 1 && a.vgroup >= 1 && a.B * a.H * ((a.N + a.C - 1) / a.C) <= INT32_MAX;
}

cudaError_t delta_wy16(const Wy16Args& a, cudaStream_t st) {
  if (!delta_wy16_takes(a)) return cudaErrorInvalidValue;
  cudaError_t e;
  if (!tf32_device(&e)) return e != cudaSuccess ? e : cudaErrorInvalidDeviceFunction;
  const int64_t nc = (a.N + a.C - 1) / a.C, chunks = a.B * a.H * nc;
  if (chunks == 0) return cudaSuccess;
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
