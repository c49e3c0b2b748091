// Internal: the exchange of the small (B, H, D, E) states between the ranks of a group. The drivers of
// attention.cpp run, on several ranks: local pass -> exchange -> main pass.
//
// Each rank r holds one piece of the sequence, of n tokens; gamma^n = exp(-decay[h] * n) per head (1
// without decay), and with per-token gates exp(sum of the piece's log gates - decay[h] * n) per (b, h). The update of a state S by a piece, gamma^n S + X, is written once on the host
// (decayed_sum in exchange.cpp); the peer hop's kernel (kernels/peer_hop.cu) does it on the device.
//
// Forward: L_r is the piece's local state (fwd_local: reads k and v only). The first rank starts from
// the user's initial state (or exactly zero); S_in(r) = S_out(r - 1) and S_out(r) = gamma^n S_in(r) + L_r.
// Backward: M_r is the piece's local state gradient (bwd_local: reads q and dout only) and U_r the
// gradient of the state rank r returned (the user's grad_final_state, maybe none). Rank r's
// G_r = U_r + G_in(r + 1) (the gradient w.r.t. its outgoing state; the last rank: U_r alone) and
// G_in(r) = gamma^n G_r + M_r (w.r.t. its incoming state) = gamma^n G_in(r + 1) + X_r, X_r = gamma^n U_r + M_r.
//
// Implementations (make_exchange picks one; every rank of the group picks the same):
//   C10dRing  strategy "ring" over the process group's send/recv (NCCL or Gloo). Forward: the receive
//             from r - 1 is posted first; gamma^n is made before any wait, so each hop's critical path is
//             one update; then receive, update, send to r + 1 (waited before the main pass). Backward:
//             the last rank sends X_r to r - 1 and runs bwd_prepare beside the send; the others post the
//             receive from r + 1, run bwd_prepare beside it, then update and send to r - 1.
//   PeerRing  strategy "ring" over peer memory (Transport::Peer): one kernel per hop (PeerHop) receives,
//             updates and sends on; gamma^n is made in the kernel per head (the host makes it only to fold
//             a state in), or with gates on the stream before the hop, per (b, h) (Transport::Auto keeps
//             gated calls on the process group). The hop runs on the stream, in order with the passes: forward, between the
//             local and the main pass; backward, the last rank sends X_r before its bwd_prepare pass
//             (the chain starts at once), the others run bwd_prepare first, then their hop (which waits
//             for the upstream rank, and would hold the prepare pass back behind it).
//   AllGather strategy "allgather" (LASP-2): one all-gather of (L_j, gamma^n_j), the first rank's L
//             folded with the initial state; each rank combines its prefix (forward) or the suffix of the
//             (X_j, gamma^n_j) (backward, bwd_prepare beside the all-gather) itself.
//   C10dScan  strategy "scan": a recursive-doubling prefix scan of the affine maps S -> gamma^n S + L over the
//             process group's send/recv: in round k (d = 2^k) rank r sends the map of ranks (r - 2d, r] it
//             has composed so far to r + d and composes the one of ranks (r - 2d, r - d] from r - d into
//             the map of the ranks before it; after ceil(log2 W) rounds that map is S_in (the first rank's
//             L folded with the initial state). One (state, gamma^n) message per round and direction,
//             instead of W - 1 hops in a chain or W - 1 states through every link of an all-gather. The
//             backward scans the suffixes (X_j, gamma^n_j) the same way, bwd_prepare beside the first round.
//             "scan:<m>" (nodes of m consecutive ranks): the same rounds within each node, then among the
//             nodes' last ranks (along the direction) over the nodes' composed maps, then each node's last
//             rank sends the state entering its node to the others: log2(m) rounds within nodes, log2(W / m)
//             across them, and one more within.
// The gated delta rule's pieces map states by (B, H, D, D) matrices, S_out = T S_in + L_r (csrc/delta.cpp):
// the same exchanges carry them (make_map_exchange; set_transition), the update T S + X, the backward's
// with T^T, and the all-gather's and the scan's packs hold T beside the state.
// Communication never runs beside the forward's compute kernels (it would take SMs from grids sized in
// whole waves): receives are posted after the local pass, and the main pass waits for the send.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "attention.h"

namespace lasp {

class Ring;

enum class Strategy : int64_t { Ring = 0, AllGather = 1, Scan = 2 };
// "ring" | "allgather" | "scan" | "scan:<m>"; any other value raises a ValueError.
Strategy parse_strategy(const std::string& s);
// The node size of "scan:<m>" (m >= 1: the group's ranks fill nodes of m consecutive ranks; the scan then runs
// within nodes first, then across them, exchange.h); 0 for any other strategy.
int64_t scan_node_size(const std::string& s);

// What the forward exchange gives the main pass.
struct ForwardStates {
  Tensor s_in;           // S_in: the state this piece starts from (the forward's third output)
  Tensor s_out;          // S_out = gamma^n S_in + L_r (the forward's second output)
  bool zero_in = false;  // S_in is exactly zero (first rank without an initial state): the main pass may skip it
};

// What the backward exchange gives the main pass.
struct BackwardStates {
  Tensor g;       // G_r, the gradient w.r.t. this piece's outgoing state; undefined: exactly zero
  Tensor g_prev;  // G_in(r) = gamma^n G_r + M_r, the gradient w.r.t. its incoming state
};

class StateExchange {
 public:
  // decay_acc: (H,) rates in the accumulation type (clamped), or undefined; n: tokens of this rank's
  // piece; gate_sum: (B, H) sums of the piece's log gates, or undefined (no gates). gamma_before_waits:
  // backward() makes gamma^n before anything else (the host implementations; their forward() makes it
  // itself, before its first wait).
  StateExchange(const Ring& ring, Tensor decay_acc, int64_t n, Tensor gate_sum, bool gamma_before_waits);
  virtual ~StateExchange() = default;

  // local: L_r (contiguous (B, H, D, E), accumulation type); initial_state: read by the first rank only.
  virtual ForwardStates forward(Tensor local, const std::optional<Tensor>& initial_state) = 0;

  // m: M_r; g_user: U_r (undefined: none). overlap runs bwd_prepare, beside the communication where
  // the implementation can (header comment).
  BackwardStates backward(Tensor m, const Tensor& g_user, const std::function<void()>& overlap);

  // An explicit transition in place of gamma^n: contiguous (B, H, D, D) matrices in the accumulation type,
  // the update then T S + X (the gated delta rule's pieces, make_map_exchange). Before forward / backward.
  void set_transition(Tensor transition);

 protected:
  // What arrives from the later ranks for X_r = gamma^n U_r + M_r.
  struct Suffix {
    Tensor g_next;  // G_in(r + 1); undefined on the last rank (nothing arrives)
    Tensor g_prev;  // G_in(r) = gamma^n G_in(r + 1) + X_r (X_r itself on the last rank)
  };
  virtual Suffix backward_exchange(Tensor x, const std::function<void()>& overlap) = 0;

  // gamma^n per head, (1, H, 1, 1), or with gates per (b, h), (B, H, 1, 1); made on first use; undefined
  // without decay and gates.
  const Tensor& gamma();
  // gamma^n flattened, with one entry per head (no gates: ones without decay) or per (b, h) (gates): what
  // the all-gather exchanges beside each state.
  Tensor gamma_flat(const Tensor& like);  // like: a (B, H, D, E) state
  // gamma^n s + add (T s + add with an explicit transition): the one update of a state by this piece.
  Tensor update(const Tensor& s, const Tensor& add);
  // The shape of the transition exchanged beside each state (the all-gather's and the scan's packs): the
  // transition's, or (1, H, 1, 1) with neither decay nor gates (ones).
  std::vector<int64_t> transition_shape(const Tensor& like);
  // The first rank of a ring: S_in is the initial state (a copy) or zero, S_out = gamma^n S_in + L.
  ForwardStates first_rank(const Tensor& local, const std::optional<Tensor>& initial_state);
  // The strategies that combine a prefix themselves: `before` is S_in (unused on the first rank, whose
  // `local` has the initial state folded in), S_out = gamma^n S_in + local.
  ForwardStates from_prefix(const Tensor& local, const Tensor& before, const std::optional<Tensor>& initial_state);
  // ... and a suffix: `after` is G_in(r + 1) (unused on the last rank), G_in(r) = gamma^n G_in(r + 1) + x.
  Suffix from_suffix(const Tensor& x, const Tensor& after);

  const Ring& ring_;
  const Tensor decay_acc_;
  const int64_t n_;
  const Tensor gate_sum_;

 private:
  const bool gamma_before_waits_;
  Tensor gamma_;
};

// The exchange for this call (a group of two or more ranks): PeerRing when the ring may use the peer
// hop (decided from what every rank shares: backend, strategy, dtype, state size, transport; the first
// decision per group and state size is a collective), else C10dRing or AllGather by strategy.
// backend: the backend's kernels (not the empty-piece ones), so that every rank decides alike.
// scan_nodes: scan_node_size of the strategy's name (0: the flat scan).
std::unique_ptr<StateExchange> make_exchange(const Kernels& backend, const Ring& ring, Strategy strategy,
                                             const Tensor& q, int64_t D, int64_t E, const Tensor& decay_acc,
                                             int64_t n, const Tensor& gate_sum, int64_t scan_nodes = 0);

// The exchange of a chain of pieces whose maps are S -> T S + L with (B, H, D, D) matrices T (the gated
// delta rule), with `transition` (the backward's: T^T) set: C10dRing, AllGather or C10dScan by strategy, or,
// for the ring with transport "peer" asked for explicitly (float32 states on a device with a registered
// peer transport), PeerMapRing: each hop in two peer calls around the host-side update T S + L ("auto"
// keeps these rings on the process group until the two-call hop has run across GPUs). like: a state of
// the call (device, size).
std::unique_ptr<StateExchange> make_map_exchange(const Ring& ring, Strategy strategy, Tensor transition,
                                                 const Tensor& like, int64_t scan_nodes = 0);

// The peer-memory transport of a device type (csrc/cuda registers CUDA's at static initialisation), for the
// exchanges made without a backend's Kernels (make_map_exchange). Returns true (to initialise a static).
bool register_peer_transport(c10::DeviceType type, std::function<void(const PeerHop&)> hop,
                             std::function<bool(const Ring&, const at::Device&, int64_t, bool)> ready);

}  // namespace lasp
