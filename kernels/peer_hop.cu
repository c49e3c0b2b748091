// The peer-memory hop of the LASP state ring (see peer_hop.h for the protocol).
#include "peer_hop.h"

#include "lasp_params.h"

namespace lasp {
namespace cuda {
namespace {

constexpr int kHopThreads = 256;

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Waits until *flag has reached `want` (counters wrap: compared as a signed difference).
__device__ bool wait_reached(const uint32_t* flag, uint32_t want, uint64_t timeout_ns) {
  if (static_cast<int32_t>(ld_acquire_sys(flag) - want) >= 0) return true;
  const uint64_t t0 = global_ns();
  while (static_cast<int32_t>(ld_acquire_sys(flag) - want) < 0) {
    if (global_ns() - t0 > timeout_ns) return false;
    __nanosleep(64);
  }
  return true;
}

__device__ __forceinline__ float4 fma4(float g, float4 a, float4 b) {
  return make_float4(fmaf(g, a.x, b.x), fmaf(g, a.y, b.y), fmaf(g, a.z, b.z), fmaf(g, a.w, b.w));
}

// gamma^n of element i's head: exp(-rate * n), the product rounded to float32 as the ops' decay_pow does,
// the exponential in double (the kernels build with fast math, whose expf is approximate)
__device__ __forceinline__ float gamma_of(const PeerHopParams& p, int64_t i) {
  if (p.gamma) return __ldg(p.gamma + i / p.per_head);  // per (b, h)
  if (!p.decay) return 1.f;
  const float x = finite_rate(p.decay[(i / p.per_head) % p.H]) * static_cast<float>(-p.n);
  return static_cast<float>(exp(static_cast<double>(x)));
}

template <bool kVec>
__global__ void __launch_bounds__(kHopThreads) peer_hop_kernel(PeerHopParams p, int64_t chunk) {
  const int b = blockIdx.x;
  __shared__ int status;  // 0 ok, else the timed_out code
  if (threadIdx.x == 0) {
    int s = 0;
    if (p.recv && !wait_reached(p.in_flags + b, p.seq, p.timeout_ns)) s = 1;
    if (s == 0 && p.send && !wait_reached(p.ack_flags + b, p.seq - 1, p.timeout_ns)) s = 2;
    status = s;
    if (s != 0) {
      *reinterpret_cast<volatile int*>(p.timed_out) = s;
      __threadfence_system();
    }
  }
  __syncthreads();
  if (status != 0) {
    if (p.trap_on_timeout) __trap();
    return;
  }
  const int64_t begin = b * chunk;
  const int64_t end = begin + chunk < p.numel ? begin + chunk : p.numel;
  if (kVec) {
    for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * kHopThreads) {
      float4 x = __ldg(reinterpret_cast<const float4*>(p.add + i));
      if (p.recv) {
        const float4 in = __ldcg(reinterpret_cast<const float4*>(p.inbox + i));
        x = fma4(gamma_of(p, i), in, x);
        if (p.in_copy) *reinterpret_cast<float4*>(p.in_copy + i) = in;
        *reinterpret_cast<float4*>(p.out + i) = x;
      }
      if (p.send) __stcg(reinterpret_cast<float4*>(p.next_inbox + i), x);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kHopThreads) {
      float x = p.add[i];
      if (p.recv) {
        const float in = __ldcg(p.inbox + i);
        x = fmaf(gamma_of(p, i), in, x);
        if (p.in_copy) p.in_copy[i] = in;
        p.out[i] = x;
      }
      if (p.send) __stcg(p.next_inbox + i, x);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // the slice (and the reads of the inbox) before the flags
    if (p.recv) st_release_sys(p.up_ack_flags + b, p.seq);
    if (p.send) st_release_sys(p.next_in_flags + b, p.seq);
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

size_t peer_inbox_bytes(int64_t numel) { return (static_cast<size_t>(numel) * sizeof(float) + 255) / 256 * 256; }

size_t peer_buffer_bytes(int64_t numel) { return 2 * peer_inbox_bytes(numel) + 4 * kPeerSlices * sizeof(uint32_t); }

void peer_hop_addresses(PeerHopParams& p, char* const* bases, int64_t numel, int rank, int world, int dir) {
  const size_t inbox_bytes = peer_inbox_bytes(numel);
  auto inbox = [&](int r) { return reinterpret_cast<float*>(bases[r] + dir * inbox_bytes); };
  // flags of a rank: in[0], ack[0], in[1], ack[1], kPeerSlices each
  auto flags = [&](int r, int which) {
    return reinterpret_cast<uint32_t*>(bases[r] + 2 * inbox_bytes) + (2 * dir + which) * kPeerSlices;
  };
  const int up = dir == 0 ? rank - 1 : rank + 1;
  const int down = dir == 0 ? rank + 1 : rank - 1;
  p.recv = up >= 0 && up < world;
  p.send = down >= 0 && down < world;
  if (p.recv) {
    p.inbox = inbox(rank);
    p.in_flags = flags(rank, 0);
    p.up_ack_flags = flags(up, 1);
  }
  if (p.send) {
    p.ack_flags = flags(rank, 1);
    p.next_inbox = inbox(down);
    p.next_in_flags = flags(down, 0);
  }
}

cudaError_t peer_hop(const PeerHopParams& p, cudaStream_t stream) {
  if (!p.recv && !p.send) return cudaSuccess;
  const bool vec = p.numel % 4 == 0 && p.per_head % 4 == 0 && aligned16(p.add) && aligned16(p.in_copy) &&
                   aligned16(p.out) && aligned16(p.inbox) && aligned16(p.next_inbox);
  int64_t chunk = (p.numel + kPeerSlices - 1) / kPeerSlices;
  chunk = (chunk + 3) / 4 * 4;
  if (vec) {
    peer_hop_kernel<true><<<kPeerSlices, kHopThreads, 0, stream>>>(p, chunk);
  } else {
    peer_hop_kernel<false><<<kPeerSlices, kHopThreads, 0, stream>>>(p, chunk);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lasp
