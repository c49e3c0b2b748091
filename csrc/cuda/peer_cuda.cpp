// The peer-memory transport of the ring (Transport::Peer): per (group, device, state size) one symmetric
// allocation (torch symmetric memory) that holds this rank's two inboxes and their flags, and the
// hop kernel of kernels/peer_hop.cu launched on the current stream.
#include "peer_cuda.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/csrc/distributed/c10d/symm_mem/SymmetricMemory.hpp>

#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "peer_hop.h"
#include "ring.h"

namespace lasp {
namespace {

namespace symm = c10d::symmetric_memory;

// A wait on another rank inside the hop kernel gives up after this long without a configured timeout
// (the default timeout of an NCCL process group), then traps: the job ends in a CUDA error, not a hang.
constexpr uint64_t kDefaultTimeoutNs = 600ull * 1000 * 1000 * 1000;

struct Channel {
  at::Tensor buf;  // this rank's symmetric allocation
  c10::intrusive_ptr<symm::SymmetricMemory> handle;
  std::vector<char*> bases;  // every group rank's allocation, as this device addresses it
  uint32_t seq[2] = {0, 0};  // calls so far, per direction (the same on every rank)
  int* timed_out = nullptr;  // host-mapped, set by the kernel when a wait gave up
  int* timed_out_dev = nullptr;
  std::string broken;        // set once a hop timed out: the flags no longer match across ranks
};

// One channel per (group, device, state floats). Channels live as long as the process: their memory is
// mapped into the other ranks.
Channel& channel(const Ring& ring, const at::Tensor& like) {
  static std::mutex mu;
  static auto* channels = new std::map<std::tuple<std::string, int, int64_t>, Channel*>();
  const auto key = std::make_tuple(ring.group_name(), static_cast<int>(like.get_device()), like.numel());
  std::lock_guard<std::mutex> lock(mu);
  auto it = channels->find(key);
  if (it != channels->end()) return *it->second;

  // Every rank first meets in the process group, under the configured timeout: a rank that never calls
  // then ends in the group's timeout error here rather than in the rendezvous's store waits.
  at::Tensor hello = at::ones({1}, like.options());
  ring.allgather(hello, "the start of the peer ring transport (every rank of the group must call)");

  auto* ch = new Channel();
  const int64_t bytes = static_cast<int64_t>(cuda::peer_buffer_bytes(like.numel()));
  try {
    ch->buf = symm::empty_strided_p2p({bytes}, {1}, at::kByte, like.device(), std::nullopt, std::nullopt);
    ch->buf.zero_();
    // The zeroed flags must be in place before any peer can write them: every rank finishes its memset
    // before the rendezvous (a collective) returns anywhere.
    C10_CUDA_CHECK(cudaStreamSynchronize(at::cuda::getCurrentCUDAStream()));
    ch->handle = symm::rendezvous(ch->buf, ring.group_name());
  } catch (const std::exception& e) {
    delete ch;
    TORCH_CHECK(false, "lasp_attention: the peer ring transport could not map the memory of group '",
                ring.group_name(), "' (", e.what(),
                "). It needs every rank of the group on one node with peer access; use "
                "lasp.set_ring_transport('nccl') otherwise.");
  }
  TORCH_CHECK(ch->handle->world_within_direct_access(), "lasp_attention: the ranks of group '", ring.group_name(),
              "' cannot all reach each other's memory; the peer ring transport needs every rank on one node "
              "with peer access. Use lasp.set_ring_transport('nccl').");
  const auto ptrs = ch->handle->get_buffer_ptrs();
  TORCH_CHECK(static_cast<int>(ptrs.size()) == ring.size() && ch->handle->get_rank() == ring.rank(),
              "lasp_attention: the peer memory of group '", ring.group_name(), "' has ", ptrs.size(),
              " ranks (this one ", ch->handle->get_rank(), "), expected ", ring.size(), " (this one ", ring.rank(),
              ")");
  const ptrdiff_t offset = static_cast<char*>(ch->buf.data_ptr()) - static_cast<char*>(ptrs[ring.rank()]);
  for (void* ptr : ptrs) ch->bases.push_back(static_cast<char*>(ptr) + offset);
  C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&ch->timed_out), sizeof(int), cudaHostAllocMapped));
  *ch->timed_out = 0;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ch->timed_out_dev), ch->timed_out, 0));
  channels->emplace(key, ch);
  return *ch;
}

const float* fptr(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat && t.is_contiguous() && t.is_cuda());
  return t.data_ptr<float>();
}

}  // namespace

void peer_hop_cuda(const PeerHop& h) {
  const Ring& ring = *h.ring;
  TORCH_INTERNAL_ASSERT(h.dir == 0 || h.dir == 1);
  Channel& ch = channel(ring, h.add);
  TORCH_CHECK(ch.broken.empty(), "lasp_attention: ", h.what, ": ", ch.broken);
  const size_t inbox_bytes = cuda::peer_inbox_bytes(h.add.numel());
  auto inbox = [&](int rank) { return reinterpret_cast<float*>(ch.bases[rank] + h.dir * inbox_bytes); };
  // flags of a rank: in[0], ack[0], in[1], ack[1], kPeerSlices each
  auto flags = [&](int rank, int which) {
    return reinterpret_cast<uint32_t*>(ch.bases[rank] + 2 * inbox_bytes) + (2 * h.dir + which) * cuda::kPeerSlices;
  };
  const int up = h.dir == 0 ? ring.rank() - 1 : ring.rank() + 1;
  const int down = h.dir == 0 ? ring.rank() + 1 : ring.rank() - 1;

  cuda::PeerHopParams p;
  p.numel = h.add.numel();
  p.H = h.add.size(1);
  p.per_head = h.add.size(2) * h.add.size(3);
  p.gamma = fptr(h.gamma_h);
  p.add = fptr(h.add);
  p.recv = h.recv;
  p.send = h.send;
  if (h.recv) {
    p.in_copy = const_cast<float*>(fptr(h.in_copy));
    p.out = const_cast<float*>(fptr(h.out));
    p.inbox = inbox(ring.rank());
    p.in_flags = flags(ring.rank(), 0);
    p.up_ack_flags = flags(up, 1);
  }
  if (h.send) {
    p.ack_flags = flags(ring.rank(), 1);
    p.next_inbox = inbox(down);
    p.next_in_flags = flags(down, 0);
  }
  p.seq = ++ch.seq[h.dir];
  const auto timeout = group_checks().timeout;
  p.timeout_ns = timeout.has_value() ? static_cast<uint64_t>(timeout->count()) * 1000 * 1000 : kDefaultTimeoutNs;
  p.timed_out = ch.timed_out_dev;
  p.trap_on_timeout = !timeout.has_value();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cuda::peer_hop(p, stream));
  if (timeout.has_value()) {
    // The opt-in bound of set_group_checks: the host waits for the hop (a host sync, as on NCCL), and a
    // hop whose wait gave up raises here instead of trapping.
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (*reinterpret_cast<volatile int*>(ch.timed_out) != 0) {
      const bool upstream = *reinterpret_cast<volatile int*>(ch.timed_out) == 1;
      ch.broken = std::string("timed out after ") + std::to_string(timeout->count()) + " ms waiting for " +
                  (upstream ? "the state from rank " + std::to_string(up)
                            : "rank " + std::to_string(down) + " to take the previous state") +
                  " of group '" + ring.group_name() +
                  "'; does every rank of the group call lasp_attention, in the same order?";
      TORCH_CHECK(false, "lasp_attention: ", h.what, " ", ch.broken);
    }
  }
}

}  // namespace lasp
