// The peer-memory hop of the ring for CUDA tensors (see kernels/peer_hop.h and Transport::Peer).
#pragma once
#include "attention.h"
#include "ring.h"

namespace lasp {

void peer_hop_cuda(const PeerHop& h);
bool peer_ready_cuda(const Ring& ring, const at::Device& device, int64_t numel, bool required);

}  // namespace lasp
