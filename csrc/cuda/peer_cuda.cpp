// The peer-memory transport of the ring (Transport::Peer): per (group, device, state size) one buffer
// that holds this rank's two inboxes and their flags, mapped into the neighbouring ranks with CUDA IPC,
// and the hop kernel of kernels/peer_hop.cu launched on the current stream.
#include "peer_cuda.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "peer_hop.h"
#include "ring.h"

namespace lasp {
namespace {

// A wait on another rank inside the hop kernel gives up after this long without a configured timeout
// (the default timeout of an NCCL process group), then traps: the job ends in a CUDA error, not a hang.
constexpr uint64_t kDefaultTimeoutNs = 600ull * 1000 * 1000 * 1000;

struct Channel {
  char* base = nullptr;      // this rank's buffer (cudaMalloc: its own allocation, so it can be shared)
  std::vector<char*> bases;  // every group rank's buffer as this device addresses it (neighbours only)
  uint32_t seq[2] = {0, 0};  // calls so far, per direction (the same on every rank)
  int* timed_out = nullptr;  // host-mapped, set by the kernel when a wait gave up
  int* timed_out_dev = nullptr;
  std::string broken;        // set once a hop timed out: the flags no longer match across ranks
};

// What a rank tells the others when a channel is made: its buffer's IPC handle and its host.
struct Hello {
  cudaIpcMemHandle_t handle;
  uint64_t host;
};

uint64_t host_id() {
  char name[256] = {0};
  gethostname(name, sizeof(name) - 1);
  std::string id(name);
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string boot_id;
  if (boot >> boot_id) id += "/" + boot_id;
  return std::hash<std::string>()(id);
}

// One channel per (group, device, state floats), made by the first call that needs it on every rank of
// the group: one all-gather of IPC handles and hosts, then one of whether each rank could map its
// neighbours (both under the group checks' timeout), so that every rank reaches the same verdict.
// Channels live as long as the process: their memory is mapped into the neighbours.
Channel* make_channel(const Ring& ring, const at::Device& device, int64_t numel, bool required) {
  auto ch = std::make_unique<Channel>();
  const size_t bytes = cuda::peer_buffer_bytes(numel);
  C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ch->base), bytes));
  // Zero flags before any neighbour can see the buffer: the memset finishes before this rank joins the
  // all-gather below, and a neighbour writes only after it.
  C10_CUDA_CHECK(cudaMemset(ch->base, 0, bytes));
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  Hello mine{};
  C10_CUDA_CHECK(cudaIpcGetMemHandle(&mine.handle, ch->base));
  mine.host = host_id();
  auto gather = [&](const void* data, size_t n, const char* what) {
    at::Tensor t = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(t.data_ptr(), data, n);
    if (ring.backend_is_nccl()) t = t.to(device);
    std::vector<at::Tensor> all = ring.allgather(t, what);
    for (auto& a : all) a = a.cpu();
    return all;
  };
  const auto hellos = gather(&mine, sizeof(Hello), "the exchange that starts the peer ring transport (every rank must call)");
  auto hello = [&](int r) {
    Hello h{};
    std::memcpy(&h, hellos[r].data_ptr(), sizeof(Hello));
    return h;
  };
  for (int r = 0; r < ring.size(); ++r) {
    if (hello(r).host == mine.host) continue;
    TORCH_CHECK(!required, "lasp_attention: ranks ", ring.rank(), " and ", r, " of group '", ring.group_name(),
                "' are on different hosts; the peer ring transport needs every rank of the group on one node. "
                "Use lasp.set_ring_transport('nccl') or 'auto'.");
    return nullptr;  // every rank sees the same hosts: all fall back together
  }
  ch->bases.assign(ring.size(), nullptr);
  ch->bases[ring.rank()] = ch->base;
  std::string failure;
  for (int r : {ring.rank() - 1, ring.rank() + 1}) {
    if (r < 0 || r >= ring.size()) continue;
    void* ptr = nullptr;
    const cudaError_t err = cudaIpcOpenMemHandle(&ptr, hello(r).handle, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      cudaGetLastError();
      failure = "rank " + std::to_string(ring.rank()) + " cannot map the memory of rank " + std::to_string(r) +
                " (" + cudaGetErrorString(err) + ")";
      break;
    }
    ch->bases[r] = static_cast<char*>(ptr);
  }
  const uint8_t ok = failure.empty() ? 1 : 0;
  const auto oks = gather(&ok, 1, "the exchange that starts the peer ring transport (every rank must call)");
  for (int r = 0; r < ring.size(); ++r) {
    if (oks[r].data_ptr<uint8_t>()[0] == 1) continue;
    TORCH_CHECK(!required, "lasp_attention: the peer ring transport cannot run on group '", ring.group_name(),
                "': rank ", r, " cannot map its neighbours' memory",
                failure.empty() ? std::string() : " (here: " + failure + ")",
                ". It needs peer access between the GPUs of the group; use lasp.set_ring_transport('nccl') or "
                "'auto'.");
    return nullptr;
  }
  C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&ch->timed_out), sizeof(int), cudaHostAllocMapped));
  *ch->timed_out = 0;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&ch->timed_out_dev), ch->timed_out, 0));
  return ch.release();
}

using ChannelKey = std::tuple<std::string, int, int64_t>;

std::map<ChannelKey, Channel*>& channels() {
  static auto* map = new std::map<ChannelKey, Channel*>();  // null entries: the group cannot use peer memory
  return *map;
}
std::mutex& channels_mutex() {
  static std::mutex mu;
  return mu;
}

ChannelKey channel_key(const Ring& ring, const at::Device& device, int64_t numel) {
  return std::make_tuple(ring.group_name(), static_cast<int>(device.index()), numel);
}

const float* fptr(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat && t.is_contiguous() && t.is_cuda());
  return t.data_ptr<float>();
}

}  // namespace

bool peer_ready_cuda(const Ring& ring, const at::Device& device, int64_t numel, bool required) {
  // A captured hop would replay its call number: CUDA graphs keep to NCCL ("auto") or are refused ("peer").
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    TORCH_CHECK(!required, "lasp_attention: the peer ring transport cannot be captured in a CUDA graph; use "
                "lasp.set_ring_transport('nccl') or 'auto' (which uses NCCL while capturing).");
    return false;
  }
  const auto key = channel_key(ring, device, numel);
  std::lock_guard<std::mutex> lock(channels_mutex());
  auto it = channels().find(key);
  if (it == channels().end()) it = channels().emplace(key, make_channel(ring, device, numel, required)).first;
  TORCH_CHECK(it->second != nullptr || !required, "lasp_attention: the peer ring transport cannot run on group '",
              ring.group_name(), "' (its ranks are on several hosts or lack peer access); use "
              "lasp.set_ring_transport('nccl') or 'auto'.");
  return it->second != nullptr;
}

void peer_hop_cuda(const PeerHop& h) {
  const Ring& ring = *h.ring;
  TORCH_INTERNAL_ASSERT(h.dir == 0 || h.dir == 1);
  Channel* found = nullptr;
  {
    std::lock_guard<std::mutex> lock(channels_mutex());
    auto it = channels().find(channel_key(ring, h.add.device(), h.add.numel()));
    if (it != channels().end()) found = it->second;
  }
  TORCH_INTERNAL_ASSERT(found != nullptr, "peer hop without a ready channel");
  Channel& ch = *found;
  TORCH_CHECK(ch.broken.empty(), "lasp_attention: ", h.what, ": ", ch.broken);
  const int up = h.dir == 0 ? ring.rank() - 1 : ring.rank() + 1;
  const int down = h.dir == 0 ? ring.rank() + 1 : ring.rank() - 1;

  cuda::PeerHopParams p;
  cuda::peer_hop_addresses(p, ch.bases.data(), h.add.numel(), ring.rank(), ring.size(), h.dir);
  p.numel = h.add.numel();
  p.H = h.add.size(1);
  p.per_head = h.add.size(2) * h.add.size(3);
  p.decay = fptr(h.decay);
  p.n = h.n;
  p.gamma = fptr(h.gamma);
  p.add = fptr(h.add);
  if (p.recv) {
    p.in_copy = const_cast<float*>(fptr(h.in_copy));
    p.out = const_cast<float*>(fptr(h.out));
  }
  TORCH_INTERNAL_ASSERT(h.phase >= 0 && h.phase <= 2);
  if (h.phase == 1) p.send = false;
  if (h.phase == 2) p.recv = false;
  p.seq = h.phase == 2 ? ch.seq[h.dir] : ++ch.seq[h.dir];  // a phase-2 call is the phase-1 call's second half
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
