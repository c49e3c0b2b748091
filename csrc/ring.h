// The LASP state ring over a torch.distributed process group (c10d), from C++.
// The same code runs on Gloo (CPU tensors) and NCCL (CUDA tensors). Group rank order is sequence order.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <string>
#include <utility>
#include <vector>

namespace lasp {

// Process-wide settings of the distributed checks (lasp.set_group_checks in Python).
struct GroupChecks {
  // Exchange and compare call descriptions before each ring. Unset ("auto"): on for groups that are
  // not NCCL (Gloo: the host waits anyway, so the check is cheap), off for NCCL (it costs a host sync).
  std::optional<bool> enabled;
  // Bound on each wait on another rank; unset: the process group's own timeout.
  std::optional<std::chrono::milliseconds> timeout;
};
GroupChecks& group_checks();

// How the ring's states travel between ranks holding CUDA tensors (lasp.set_ring_transport in Python;
// start-up default from env LASP_RING_TRANSPORT=auto|nccl|peer).
//   Nccl: the process group's send/recv (any backend, any topology).
//   Peer: one kernel per hop that writes the state straight into the next rank's memory (mapped with
//         CUDA IPC; every rank of the group on one node with peer access). float32 states of the ring
//         strategy only; other calls use the process group. Raises when the group cannot use it.
//   Auto (default): Peer for NCCL groups whose ranks can all use it (decided together, once per group
//         and state size), else Nccl.
enum class Transport { Nccl = 0, Peer = 1, Auto = 2 };
Transport& ring_transport();
// "auto" | "nccl" | "peer" -> Transport; any other value raises "<what> must be 'auto', 'nccl' or 'peer',
// got '<value>'" (a ValueError in Python).
Transport parse_transport(const std::string& value, const char* what);
const char* transport_name(Transport t);

class Ring {
 public:
  // No group name (or a group of one rank): a ring of size 1, which never communicates.
  explicit Ring(const std::optional<std::string>& group_name);

  int rank() const { return rank_; }
  const std::string& group_name() const { return group_name_; }
  bool checks_on() const;
  bool backend_is_nccl() const;
  int size() const { return size_; }
  bool is_first() const { return rank_ == 0; }
  bool is_last() const { return rank_ == size_ - 1; }

  // Point-to-point with the neighbours in sequence order; each returns the pending work.
  // `t` must be contiguous and stay alive until the work is waited on.
  c10::intrusive_ptr<c10d::Work> send_next(at::Tensor& t, int tag) const;
  c10::intrusive_ptr<c10d::Work> recv_prev(at::Tensor& t, int tag) const;
  c10::intrusive_ptr<c10d::Work> send_prev(at::Tensor& t, int tag) const;
  c10::intrusive_ptr<c10d::Work> recv_next(at::Tensor& t, int tag) const;
  // Point-to-point with any group rank (the scan strategy's partners).
  c10::intrusive_ptr<c10d::Work> send_to(at::Tensor& t, int peer, int tag) const;
  c10::intrusive_ptr<c10d::Work> recv_from(at::Tensor& t, int peer, int tag) const;

  // Every rank's copy of `t` (same shape on every rank), in group rank order.
  std::vector<at::Tensor> allgather(at::Tensor& t, const char* what) const;
  // The same, started: fills `out` once the returned work is waited on (work is null for one rank).
  c10::intrusive_ptr<c10d::Work> allgather_start(at::Tensor& t, std::vector<std::vector<at::Tensor>>& out) const;

  // Opt-in group checks (see GroupChecks): every rank exchanges a small description of its call and
  // raises the same error when they disagree. `what` names the call in the message. valid: false where the
  // rank's own checks of the call failed; then every rank raises (a ValueError naming those ranks; the
  // caller raises its own error instead) and no field is compared.
  void check_same_call(const std::vector<std::pair<const char*, int64_t>>& fields, const char* what,
                       const at::Device& device, bool valid = true) const;

  // Waits for `work`; with group checks on, at most the configured timeout (then raises).
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) const;

  static constexpr int kForwardTag = 0x1A5;
  static constexpr int kBackwardTag = 0x1A6;

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  std::string group_name_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace lasp
