// The LASP state ring over a torch.distributed process group (c10d), from C++.
// The same code runs on Gloo (CPU tensors) and NCCL (CUDA tensors). Group rank order is sequence order.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <string>

namespace lasp {

class Ring {
 public:
  // No group name (or a group of one rank): a ring of size 1, which never communicates.
  explicit Ring(const std::optional<std::string>& group_name);

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_first() const { return rank_ == 0; }
  bool is_last() const { return rank_ == size_ - 1; }

  // Point-to-point with the neighbours in sequence order; each returns the pending work.
  // `t` must be contiguous and stay alive until the work is waited on.
  c10::intrusive_ptr<c10d::Work> send_next(at::Tensor& t, int tag) const;
  c10::intrusive_ptr<c10d::Work> recv_prev(at::Tensor& t, int tag) const;
  c10::intrusive_ptr<c10d::Work> send_prev(at::Tensor& t, int tag) const;
  c10::intrusive_ptr<c10d::Work> recv_next(at::Tensor& t, int tag) const;

  static constexpr int kForwardTag = 0x1A5;
  static constexpr int kBackwardTag = 0x1A6;

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace lasp
