#include "ring.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <chrono>
#include <cstdlib>
#include <sstream>
#include <thread>
#include <vector>

namespace lasp {

Ring::Ring(const std::optional<std::string>& group_name) {
  if (!group_name.has_value()) return;
  pg_ = c10d::resolve_process_group(*group_name);
  group_name_ = *group_name;
  TORCH_CHECK(pg_, "lasp_attention: group '", *group_name, "' is not a registered process group");
  rank_ = pg_->getRank();
  size_ = pg_->getSize();
}

namespace {
c10::intrusive_ptr<c10d::Work> p2p(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, at::Tensor& t, int peer,
                                   int tag, bool send) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  std::vector<at::Tensor> ts{t};
  return send ? pg->send(ts, peer, tag) : pg->recv(ts, peer, tag);
}
}  // namespace

GroupChecks& group_checks() {
  static GroupChecks checks = [] {
    GroupChecks c;
    if (const char* env = std::getenv("LASP_CHECK_GROUP")) {
      const std::string v(env);
      if (v == "0" || v == "1") c.enabled = v == "1";
    }
    if (const char* env = std::getenv("LASP_CHECK_TIMEOUT_S")) {
      c.timeout = std::chrono::milliseconds(static_cast<int64_t>(std::atof(env) * 1000));
    }
    return c;
  }();
  return checks;
}

Transport parse_transport(const std::string& value, const char* what) {
  for (Transport t : {Transport::Auto, Transport::Nccl, Transport::Peer}) {
    if (value == transport_name(t)) return t;
  }
  TORCH_CHECK_VALUE(false, what, " must be 'auto', 'nccl' or 'peer', got '", value, "'");
}

const char* transport_name(Transport t) {
  switch (t) {
    case Transport::Peer: return "peer";
    case Transport::Nccl: return "nccl";
    case Transport::Auto: break;
  }
  return "auto";
}

Transport& ring_transport() {
  static Transport transport = [] {
    const char* env = std::getenv("LASP_RING_TRANSPORT");
    return parse_transport(env == nullptr ? "auto" : env, "lasp: env LASP_RING_TRANSPORT");
  }();
  return transport;
}

bool Ring::backend_is_nccl() const {
  return pg_ && pg_->getBackendType() == c10d::ProcessGroup::BackendType::NCCL;
}

bool Ring::checks_on() const {
  if (size_ <= 1) return false;
  return group_checks().enabled.value_or(!backend_is_nccl());
}

void Ring::wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) const {
  const auto timeout = group_checks().timeout;
  bool done = false;
  try {
    if (timeout.has_value() && backend_is_nccl()) {
      // NCCL's wait(timeout) would abort the communicator when the time is up (and that can block while
      // a peer holds it open). The host polls instead (a host sync: the documented cost of the opt-in
      // timeout); a rank that never calls then ends in the error below, and the communicator is left to
      // the process group's own watchdog.
      const auto deadline = std::chrono::steady_clock::now() + *timeout;
      while (!(done = work->isCompleted()) && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      if (done) work->wait();  // orders the current stream after the work (and rethrows its error)
    } else {
      // Gloo's wait returns once the work is done, or throws at the timeout.
      done = timeout.has_value() ? work->wait(*timeout) : work->wait();
    }
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "lasp_attention: ", what, " failed",
                timeout.has_value() ? " or timed out after " + std::to_string(timeout->count()) + " ms" : "",
                " (does every rank of the group call lasp_attention, in the same order?): ", e.what());
  }
  TORCH_CHECK(done, "lasp_attention: ", what, " timed out",
              timeout.has_value() ? " after " + std::to_string(timeout->count()) + " ms" : "",
              "; does every rank of the group call lasp_attention, in the same order?");
}

c10::intrusive_ptr<c10d::Work> Ring::allgather_start(at::Tensor& t, std::vector<std::vector<at::Tensor>>& out) const {
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  out.assign(1, {});
  if (size_ <= 1) {
    out[0].push_back(t);
    return {};
  }
  std::vector<at::Tensor> in{t};
  for (int i = 0; i < size_; ++i) out[0].push_back(at::empty_like(t));
  return pg_->allgather(out, in);
}

std::vector<at::Tensor> Ring::allgather(at::Tensor& t, const char* what) const {
  std::vector<std::vector<at::Tensor>> out;
  auto work = allgather_start(t, out);
  if (work) wait(work, what);
  return out[0];
}

void Ring::check_same_call(const std::vector<std::pair<const char*, int64_t>>& fields, const char* what,
                           const at::Device& device, bool valid) const {
  if (size_ <= 1) return;
  std::vector<int64_t> values{valid ? 1 : 0};
  for (const auto& f : fields) values.push_back(f.second);
  // Gathered on the tensors' device for NCCL, on the CPU for other backends; the host reads it (a sync).
  at::Tensor mine = at::tensor(values, at::TensorOptions().dtype(at::kLong));
  if (backend_is_nccl()) mine = mine.to(device);
  auto all = allgather(mine, "the all-gather of the call descriptions (group checks)");
  std::vector<at::Tensor> rows;
  std::ostringstream failed;
  for (int r = 0; r < size_; ++r) {
    rows.push_back(all[r].cpu());
    if (rows.back()[0].item<int64_t>() == 0) failed << (failed.tellp() > 0 ? ", " : "") << r;
  }
  TORCH_CHECK_VALUE(failed.tellp() == 0, "lasp_attention: ", what, " is not valid on group ranks [", failed.str(),
                    "] (see their errors)");
  const at::Tensor& first = rows[0];
  for (int r = 1; r < size_; ++r) {
    const at::Tensor& other = rows[r];
    std::ostringstream diff;
    for (size_t i = 0; i < fields.size(); ++i) {
      const int64_t a = first[i + 1].item<int64_t>(), b = other[i + 1].item<int64_t>();
      if (a != b) diff << " " << fields[i].first << " (rank 0: " << a << ", rank " << r << ": " << b << ")";
    }
    TORCH_CHECK(diff.str().empty(), "lasp_attention: the ranks of the group disagree on ", what, ":", diff.str(),
                ". Every rank must pass the same batch size, heads, head dims, dtype, strategy and optional "
                "arguments; only the sequence length may differ.");
  }
}

c10::intrusive_ptr<c10d::Work> Ring::send_next(at::Tensor& t, int tag) const { return p2p(pg_, t, rank_ + 1, tag, true); }
c10::intrusive_ptr<c10d::Work> Ring::recv_prev(at::Tensor& t, int tag) const { return p2p(pg_, t, rank_ - 1, tag, false); }
c10::intrusive_ptr<c10d::Work> Ring::send_prev(at::Tensor& t, int tag) const { return p2p(pg_, t, rank_ - 1, tag, true); }
c10::intrusive_ptr<c10d::Work> Ring::recv_next(at::Tensor& t, int tag) const { return p2p(pg_, t, rank_ + 1, tag, false); }
c10::intrusive_ptr<c10d::Work> Ring::send_to(at::Tensor& t, int peer, int tag) const { return p2p(pg_, t, peer, tag, true); }
c10::intrusive_ptr<c10d::Work> Ring::recv_from(at::Tensor& t, int peer, int tag) const { return p2p(pg_, t, peer, tag, false); }

}  // namespace lasp
