#include "ring.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <vector>

namespace lasp {

Ring::Ring(const std::optional<std::string>& group_name) {
  if (!group_name.has_value()) return;
  pg_ = c10d::resolve_process_group(*group_name);
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

c10::intrusive_ptr<c10d::Work> Ring::send_next(at::Tensor& t, int tag) const { return p2p(pg_, t, rank_ + 1, tag, true); }
c10::intrusive_ptr<c10d::Work> Ring::recv_prev(at::Tensor& t, int tag) const { return p2p(pg_, t, rank_ - 1, tag, false); }
c10::intrusive_ptr<c10d::Work> Ring::send_prev(at::Tensor& t, int tag) const { return p2p(pg_, t, rank_ - 1, tag, true); }
c10::intrusive_ptr<c10d::Work> Ring::recv_next(at::Tensor& t, int tag) const { return p2p(pg_, t, rank_ + 1, tag, false); }

}  // namespace lasp
