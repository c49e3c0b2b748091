// Does compute-sanitizer's initcheck count a TMA (cp.async.bulk.tensor) store as initialising global
// memory? One block writes a 64 x 64 bf16 tile twice: to `a` by a TMA store from shared memory (the way
// the sm_90a kernels write o, dq, dk, dv) and to `b` by ordinary stores; the host copies both back and
// checks every value. Run it plain (values must match) and under `compute-sanitizer --tool initcheck`:
// a report on the copy of `a` alone, with the values right, is the tool not tracking TMA stores.
//
//   nvcc -std=c++17 -arch=sm_90a -I kernels benchmarks/tma_initcheck.cu -o /tmp/tma_initcheck
//   /tmp/tma_initcheck && compute-sanitizer --tool initcheck /tmp/tma_initcheck
#include <cuda_bf16.h>

#include <cstdio>
#include <vector>

#include "tma.cuh"
#include "wgmma.cuh"

using namespace lasp::cuda;

__global__ void write_tile(const __grid_constant__ CUtensorMap map, __nv_bfloat16* b) {
  extern __shared__ __align__(1024) unsigned char raw[];
  const uint32_t addr = mma::smem_addr(raw);
  unsigned char* sm = raw + ((1024u - (addr & 1023u)) & 1023u);
  const uint32_t base = addr + ((1024u - (addr & 1023u)) & 1023u);
  for (int i = threadIdx.x; i < 64 * 64; i += blockDim.x) {
    const int r = i / 64, c = i % 64;
    const __nv_bfloat16 x = __float2bfloat16((float)(r * 64 + c));
    *reinterpret_cast<__nv_bfloat16*>(sm + wg::sw128_offset(r, c / 8) + 2 * (c % 8)) = x;
    b[i] = x;
  }
  wg::fence_async_smem();
  __syncthreads();
  if (threadIdx.x == 0) {
    tma::store(&map, base, 0, 0, 0, 0);
    tma::store_commit();
    tma::store_wait_all();
  }
}

int main() {
  __nv_bfloat16 *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, 64 * 64 * 2) != cudaSuccess || cudaMalloc(&b, 64 * 64 * 2) != cudaSuccess) return 2;
  lasp::TensorView4 t;
  t.ptr = a;
  t.stride[0] = t.stride[1] = 64 * 64;
  t.stride[2] = 64;
  t.stride[3] = 1;
  CUtensorMap map;
  if (!tma::make_map(&map, t, /*bf16=*/true, 1, 1, 64, 64, 64)) {
    std::printf("tensor map not encoded\n");
    return 2;
  }
  const size_t smem = 64 * 128 + 1024;
  cudaFuncSetAttribute(write_tile, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  write_tile<<<1, 128, smem>>>(map, b);
  if (cudaDeviceSynchronize() != cudaSuccess) return 2;
  std::vector<__nv_bfloat16> ha(64 * 64), hb(64 * 64);
  cudaMemcpy(ha.data(), a, 64 * 64 * 2, cudaMemcpyDeviceToHost);  // initcheck: TMA-written source
  cudaMemcpy(hb.data(), b, 64 * 64 * 2, cudaMemcpyDeviceToHost);  // initcheck: ordinarily written source
  int bad = 0;
  for (int i = 0; i < 64 * 64; ++i) {
    const float want = __bfloat162float(__float2bfloat16((float)i));
    bad += __bfloat162float(ha[i]) != want || __bfloat162float(hb[i]) != want;
  }
  std::printf("tma_initcheck: %d of %d values wrong\n", bad, 2 * 64 * 64);
  return bad ? 1 : 0;
}
