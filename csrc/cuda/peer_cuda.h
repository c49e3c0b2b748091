// The peer-memory hop of the ring for CUDA tensors (see kernels/peer_hop.h and Transport::Peer).
#pragma once
#include "attention.h"

namespace lasp {

void peer_hop_cuda(const PeerHop& h);

}  // namespace lasp
