#include "exchange.h"

#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "ring.h"

namespace lasp {

namespace {

// Whether a transition is a matrix per (b, h) (B, H, D, D) rather than a factor per head or (b, h)
// (., H, 1, 1). A 1 x 1 matrix reads either way alike.
bool is_matrix(const Tensor& a) { return a.size(-1) != 1 || a.size(-2) != 1; }

// gamma^n * s + add (gamma = 1 when there is no decay), or T s + add for a matrix transition: the state
// update, for every host exchange.
Tensor decayed_sum(const Tensor& s, const Tensor& gamma_n, const Tensor& add) {
  if (!gamma_n.defined()) return s + add;
  return is_matrix(gamma_n) ? at::matmul(gamma_n, s) + add : at::addcmul(add, s, gamma_n);
}

// The transition of two maps in turn, `first` then `second`.
Tensor compose(const Tensor& second, const Tensor& first) {
  return is_matrix(second) ? at::matmul(second, first) : second * first;
}

// What a rank contributes to the all-gather strategy: its (B, H, D, E) state, flattened, then gamma^n
// (StateExchange::gamma_flat: per head, or per (b, h) with gates; every rank packs alike).
Tensor pack_state(const Tensor& x, const Tensor& gamma_flat) { return at::cat({x.flatten(), gamma_flat}); }

// LASP-2's combination of the gathered packs of ranks j = first, first + step, ... (not `end`):
// s = gamma^n_j s + X_j from s = 0 (forward: the prefix before a rank; backward: the suffix after it).
// a_shape: the shape of the transitions in each pack (StateExchange::transition_shape).
Tensor combine_packs(const std::vector<Tensor>& all, const Tensor& like, int first, int end, int step,
                     at::IntArrayRef a_shape) {
  const int64_t numel = like.numel();
  int64_t ng = 1;
  for (const int64_t x : a_shape) ng *= x;
  Tensor s = at::zeros_like(like);
  for (int j = first; j != end; j += step) {
    s = decayed_sum(s, all[j].narrow(0, numel, ng).view(a_shape), all[j].narrow(0, 0, numel).view_as(like));
  }
  return s;
}

// Strategy "ring" over the process group's send/recv (NCCL or Gloo).
class C10dRing final : public StateExchange {
 public:
  C10dRing(const Ring& ring, Tensor decay_acc, int64_t n, Tensor gate_sum)
      : StateExchange(ring, std::move(decay_acc), n, std::move(gate_sum), /*gamma_before_waits=*/true) {}

  ForwardStates forward(Tensor local, const std::optional<Tensor>& initial_state) override {
    ForwardStates f;
    if (ring_.is_first()) {
      gamma();
      f = first_rank(local, initial_state);
    } else {
      f.s_in = at::empty_like(local);
      auto recv = ring_.recv_prev(f.s_in, Ring::kForwardTag);
      gamma();  // before any wait: each hop's critical path is one update
      ring_.wait(recv, "receiving the state from the previous rank");
      f.s_out = update(f.s_in, local);  // gamma^n S_in + L_r
    }
    if (!ring_.is_last()) {
      ring_.wait(ring_.send_next(f.s_out, Ring::kForwardTag), "sending the state to the next rank");
    }
    return f;
  }

 protected:
  Suffix backward_exchange(Tensor x, const std::function<void()>& overlap) override {
    Suffix s;
    if (ring_.is_last()) {
      s.g_prev = x;
      c10::intrusive_ptr<c10d::Work> send;
      if (!ring_.is_first()) send = ring_.send_prev(s.g_prev, Ring::kBackwardTag);
      overlap();
      if (send) ring_.wait(send, "sending the state gradient to the previous rank");
      return s;
    }
    s.g_next = at::empty_like(x);
    auto recv = ring_.recv_next(s.g_next, Ring::kBackwardTag);
    overlap();
    ring_.wait(recv, "receiving the state gradient from the next rank");
    s.g_prev = update(s.g_next, x);
    if (!ring_.is_first()) {
      ring_.wait(ring_.send_prev(s.g_prev, Ring::kBackwardTag), "sending the state gradient to the previous rank");
    }
    return s;
  }
};

// Strategy "ring" over peer memory: one PeerHop kernel per direction and call.
class PeerRing final : public StateExchange {
 public:
  PeerRing(const Ring& ring, Tensor decay_acc, int64_t n, Tensor gate_sum,
           const std::function<void(const PeerHop&)>& hop)
      : StateExchange(ring, std::move(decay_acc), n, std::move(gate_sum), /*gamma_before_waits=*/false), hop_(hop) {}

  ForwardStates forward(Tensor local, const std::optional<Tensor>& initial_state) override {
    ForwardStates f;
    if (ring_.is_first()) {
      f = first_rank(local, initial_state);
    } else {
      f.s_in = at::empty_like(local);   // filled by the hop
      f.s_out = at::empty_like(local);  // filled by the hop
    }
    // Receive S_in, S_out = gamma^n S_in + L_r, send S_out on: one kernel (the first rank only sends).
    PeerHop h(ring_, 0, decay_acc_, n_, "the forward state ring (peer transport)");
    h.gamma = gate_factors();
    h.add = ring_.is_first() ? f.s_out : local;
    h.in_copy = f.s_in;
    h.out = f.s_out;
    hop_(h);
    return f;
  }

 protected:
  Suffix backward_exchange(Tensor x, const std::function<void()>& overlap) override {
    PeerHop h(ring_, 1, decay_acc_, n_, "the backward state ring (peer transport)");
    h.gamma = gate_factors();
    h.add = x;
    Suffix s;
    if (ring_.is_last()) {  // sends X_r before its prepare pass
      s.g_prev = x;
      hop_(h);
      overlap();
    } else {  // receives, updates and sends on after it
      overlap();
      s.g_next = at::empty_like(x);
      s.g_prev = at::empty_like(x);
      h.in_copy = s.g_next;
      h.out = s.g_prev;  // gamma^n G_in(r + 1) + X_r
      hop_(h);
    }
    return s;
  }

 private:
  // With gates, gamma^n per (b, h) for the kernel (made on the stream before the hop); else undefined: the
  // kernel makes gamma^n per head from the decay.
  Tensor gate_factors() { return gate_sum_.defined() ? gamma().reshape({-1}).contiguous() : Tensor(); }

  const std::function<void(const PeerHop&)>& hop_;
};

// Strategy "ring" over peer memory for explicit transitions (set_transition: the delta rule's T): each
// hop in two peer calls around the update, which the hop kernel does not make: receive S_in (phase 1),
// S_out = T S_in + L on the stream, send it on (phase 2). Every rank makes both calls of every hop.
class PeerMapRing final : public StateExchange {
 public:
  PeerMapRing(const Ring& ring, const std::function<void(const PeerHop&)>& hop)
      : StateExchange(ring, Tensor(), 0, Tensor(), /*gamma_before_waits=*/false), hop_(hop) {}

  ForwardStates forward(Tensor local, const std::optional<Tensor>& initial_state) override {
    ForwardStates f;
    if (ring_.is_first()) {
      receive(0, local, nullptr);
      f = first_rank(local, initial_state);
    } else {
      f.s_in = at::empty_like(local);
      receive(0, local, &f.s_in);
      f.s_out = update(f.s_in, local);  // T S_in + L_r
    }
    send(0, f.s_out.contiguous());
    return f;
  }

 protected:
  Suffix backward_exchange(Tensor x, const std::function<void()>& overlap) override {
    overlap();
    Suffix s;
    if (ring_.is_last()) {
      receive(1, x, nullptr);
      s.g_prev = x;
    } else {
      s.g_next = at::empty_like(x);
      receive(1, x, &s.g_next);
      s.g_prev = update(s.g_next, x);  // T^T G_in(r + 1) + X_r
    }
    send(1, s.g_prev.contiguous());
    return s;
  }

 private:
  // Phase 1 of a hop in direction dir: the state from the upstream rank into *out (none: this rank has no
  // upstream neighbour, the call only keeps the channel's call count).
  void receive(int dir, const Tensor& like, Tensor* out) {
    PeerHop h(ring_, dir, Tensor(), 0, dir == 0 ? "the forward state ring (peer transport)"
                                                : "the backward state ring (peer transport)");
    h.phase = 1;
    h.add = at::zeros_like(like);
    if (out != nullptr) h.out = *out;
    hop_(h);
  }
  // Phase 2: `state` to the downstream rank (none there: nothing is sent).
  void send(int dir, const Tensor& state) {
    PeerHop h(ring_, dir, Tensor(), 0, dir == 0 ? "the forward state ring (peer transport)"
                                                : "the backward state ring (peer transport)");
    h.phase = 2;
    h.add = state;
    hop_(h);
  }

  const std::function<void(const PeerHop&)>& hop_;
};

// Strategy "allgather" (LASP-2): one all-gather of (state, gamma^n) per direction.
class AllGather final : public StateExchange {
 public:
  AllGather(const Ring& ring, Tensor decay_acc, int64_t n, Tensor gate_sum)
      : StateExchange(ring, std::move(decay_acc), n, std::move(gate_sum), /*gamma_before_waits=*/true) {}

  ForwardStates forward(Tensor local, const std::optional<Tensor>& initial_state) override {
    gamma();
    // The first rank folds the initial state into what it contributes (its S_out).
    if (ring_.is_first() && initial_state.has_value()) local = update(*initial_state, local);
    const Tensor gf = gamma_flat(local);
    Tensor pack = pack_state(local, gf);
    const auto all = ring_.allgather(pack, "the all-gather of the local states");
    return from_prefix(local,
                       ring_.is_first() ? Tensor() : combine_packs(all, local, 0, ring_.rank(), 1, transition_shape(local)),
                       initial_state);
  }

 protected:
  Suffix backward_exchange(Tensor x, const std::function<void()>& overlap) override {
    const Tensor gf = gamma_flat(x);
    Tensor pack = pack_state(x, gf);
    std::vector<std::vector<Tensor>> gathered;
    auto work = ring_.allgather_start(pack, gathered);
    overlap();  // beside the all-gather
    ring_.wait(work, "the all-gather of the local state gradients");
    return from_suffix(x, ring_.is_last() ? Tensor()
                                          : combine_packs(gathered[0], x, ring_.size() - 1, ring_.rank(), -1,
                                                          transition_shape(x)));
  }
};

// Strategy "scan": a recursive-doubling (Hillis-Steele) scan of the pieces' affine maps S -> A S + L
// (A = gamma^n, per head or per (b, h)), over the process group's send/recv; with nodes ("scan:<m>"), within
// nodes first, then across them; exchange.h.
class C10dScan final : public StateExchange {
 public:
  C10dScan(const Ring& ring, Tensor decay_acc, int64_t n, Tensor gate_sum, int64_t node_size)
      : StateExchange(ring, std::move(decay_acc), n, std::move(gate_sum), /*gamma_before_waits=*/true),
        node_size_(node_size) {}

  ForwardStates forward(Tensor local, const std::optional<Tensor>& initial_state) override {
    gamma();
    // The first rank folds the initial state into its map's L (no state enters before it).
    if (ring_.is_first() && initial_state.has_value()) local = update(*initial_state, local);
    return from_prefix(local, scan(local, /*dir=*/1, Ring::kForwardTag, "the forward state scan", [] {}),
                       initial_state);
  }

 protected:
  Suffix backward_exchange(Tensor x, const std::function<void()>& overlap) override {
    return from_suffix(x, scan(x, /*dir=*/-1, Ring::kBackwardTag, "the backward state gradient scan", overlap));
  }

 private:
  // An affine map S -> a S + l (a: (B or 1, H, 1, 1); l: a state); undefined l: none (the identity).
  struct Map {
    Tensor a, l;
  };

  // The rounds of a recursive-doubling scan among `count` members, this one at position pos, member q being
  // group rank rank_of(q): returns the composed map of the members before pos (none for pos 0). own: this
  // member's map. overlap (if not null) runs once the first round's messages are posted.
  Map rounds(const Map& own, int pos, int count, const std::function<int(int)>& rank_of, int tag, const char* what,
             const std::function<void()>* overlap) {
    const int64_t numel = own.l.numel(), ng = own.a.numel();
    Map ex;
    for (int d = 1; d < count; d *= 2) {
      std::vector<c10::intrusive_ptr<c10d::Work>> works;
      Tensor recv_pack, send_pack;
      if (pos - d >= 0) {
        recv_pack = at::empty({numel + ng}, own.l.options());
        works.push_back(ring_.recv_from(recv_pack, rank_of(pos - d), tag));
      }
      if (pos + d < count) {  // the map of members (pos - d, pos]: this one's after the ones composed so far
        send_pack = ex.l.defined() ? at::cat({decayed_sum(ex.l, own.a, own.l).flatten(), compose(own.a, ex.a).flatten()})
                                   : pack_state(own.l, own.a.flatten());
        works.push_back(ring_.send_to(send_pack, rank_of(pos + d), tag));
      }
      if (overlap != nullptr && d == 1) (*overlap)();
      for (const auto& w : works) ring_.wait(w, what);
      if (recv_pack.defined()) {  // members (pos - 2d, pos - d] come before the ones composed so far
        const Tensor ra = recv_pack.narrow(0, numel, ng).view(own.a.sizes());
        const Tensor rl = recv_pack.narrow(0, 0, numel).view_as(own.l);
        if (ex.l.defined()) {
          ex.l = decayed_sum(rl, ex.a, ex.l);
          ex.a = compose(ex.a, ra);
        } else {
          ex = Map{ra.clone(), rl.clone()};
        }
      }
    }
    return ex;
  }

  // The composed map of every rank before this one in direction dir (1: lower ranks, the forward; -1: higher
  // ranks, the backward) applied to a zero state: its L. Undefined where there is none (the first rank of the
  // direction). overlap runs once, after the first messages are posted.
  Tensor scan(const Tensor& own_l, int dir, int tag, const char* what, const std::function<void()>& overlap) {
    const int W = ring_.size(), r = ring_.rank();
    const int m = node_size_ >= 1 && node_size_ < W ? static_cast<int>(node_size_) : W;
    const int K = (W + m - 1) / m, node = r / m;
    const int n0 = node * m, n1 = std::min(W, n0 + m), size = n1 - n0;
    const Map own{gamma_flat(own_l).view(transition_shape(own_l)), own_l};
    bool overlapped = size == 1;  // phase 1 posts nothing in a node of one rank
    if (overlapped) overlap();
    // Phase 1: within the node, in direction order (node-local position j).
    const int j = dir > 0 ? r - n0 : n1 - 1 - r;
    auto mate = [&](int q) { return dir > 0 ? n0 + q : n1 - 1 - q; };
    const Map ex = rounds(own, j, size, mate, tag, what, overlapped ? nullptr : &overlap);
    if (K == 1) return ex.l;
    // Phase 2: the nodes' last ranks (in direction order) scan the nodes' composed maps.
    const int ni = dir > 0 ? node : K - 1 - node;  // this node's position along dir
    auto leader = [&](int q) {  // the last rank along dir of the node at position q
      const int p = dir > 0 ? q : K - 1 - q;
      return dir > 0 ? std::min(W, (p + 1) * m) - 1 : p * m;
    };
    Tensor entering;  // the state entering this node (undefined for the first node along dir)
    const bool is_leader = j == size - 1;
    if (is_leader) {
      const Map inc = ex.l.defined() ? Map{compose(own.a, ex.a), decayed_sum(ex.l, own.a, own.l)} : own;
      entering = rounds(inc, ni, K, leader, tag + 0x100, what, nullptr).l;
    }
    // Phase 3: the node's last rank sends it to the others.
    if (ni > 0) {
      if (is_leader) {
        std::vector<c10::intrusive_ptr<c10d::Work>> works;
        for (int q = 0; q < size - 1; ++q) works.push_back(ring_.send_to(entering, mate(q), tag + 0x200));
        for (const auto& w : works) ring_.wait(w, what);
      } else {
        entering = at::empty_like(own_l);
        ring_.wait(ring_.recv_from(entering, leader(ni), tag + 0x200), what);
      }
    }
    if (!entering.defined()) return ex.l;
    return ex.l.defined() ? decayed_sum(entering, ex.a, ex.l) : entering;
  }

  const int64_t node_size_;
};

// Whether this call's ring uses the peer-memory hop. Decided from what every rank of the group shares
// (the backend, the strategy, the dtype, the state size and the process-wide transport), never from the
// piece's length, so that the ranks agree.
bool use_peer(const Kernels& backend_kernels, const Ring& ring, Strategy strategy, const Tensor& q, int64_t D,
              int64_t E, bool gates) {
  const Transport t = ring_transport();
  // With per-token gates the hop takes the (b, h) factors; "auto" keeps such calls on the process group until
  // the gated peer ring has run across GPUs (kernels/peer_hop.h; "peer" asks for it).
  if (gates && t == Transport::Auto) return false;
  if (t == Transport::Nccl || strategy != Strategy::Ring || ring.size() <= 1 || !backend_kernels.peer_ready ||
      acc_type(q.scalar_type()) != at::kFloat) {
    return false;
  }
  if (t == Transport::Auto && !ring.backend_is_nccl()) return false;
  return backend_kernels.peer_ready(ring, q.device(), q.size(0) * q.size(1) * D * E, t == Transport::Peer);
}

}  // namespace

Strategy parse_strategy(const std::string& s) {
  if (s == "ring") return Strategy::Ring;
  if (s == "allgather") return Strategy::AllGather;
  if (s == "scan" || scan_node_size(s) > 0) return Strategy::Scan;
  TORCH_CHECK_VALUE(false, "lasp_attention: strategy must be 'ring', 'allgather', 'scan' or 'scan:<ranks per "
                    "node>', got '", s, "'");
}

int64_t scan_node_size(const std::string& s) {
  const std::string prefix = "scan:";
  if (s.compare(0, prefix.size(), prefix) != 0 || s.size() == prefix.size() || s.size() > prefix.size() + 9) return 0;
  int64_t m = 0;
  for (size_t i = prefix.size(); i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return 0;
    m = 10 * m + (s[i] - '0');
  }
  return m;
}

StateExchange::StateExchange(const Ring& ring, Tensor decay_acc, int64_t n, Tensor gate_sum, bool gamma_before_waits)
    : ring_(ring),
      decay_acc_(std::move(decay_acc)),
      n_(n),
      gate_sum_(std::move(gate_sum)),
      gamma_before_waits_(gamma_before_waits) {}

void StateExchange::set_transition(Tensor transition) {
  gamma_ = std::move(transition);
}

std::vector<int64_t> StateExchange::transition_shape(const Tensor& like) {
  const Tensor& gm = gamma();
  return gm.defined() ? gm.sizes().vec() : std::vector<int64_t>{1, like.size(1), 1, 1};
}

const Tensor& StateExchange::gamma() {
  if (gamma_.defined()) return gamma_;
  if (gate_sum_.defined()) {
    // exp(sum g - n lambda): a sum of log gates, then one exp (a -inf gate gives exactly 0)
    Tensor log_t = decay_acc_.defined() ? gate_sum_ - decay_acc_.view({1, -1}) * static_cast<double>(n_) : gate_sum_;
    gamma_ = at::exp(log_t).view({gate_sum_.size(0), gate_sum_.size(1), 1, 1});
  } else if (decay_acc_.defined()) {
    gamma_ = at::exp(decay_acc_ * static_cast<double>(-n_)).view({1, -1, 1, 1});
  }
  return gamma_;
}

Tensor StateExchange::gamma_flat(const Tensor& like) {
  const Tensor& gm = gamma();
  if (gm.defined()) return gm.flatten();
  return at::ones({like.size(1)}, like.options());
}

Tensor StateExchange::update(const Tensor& s, const Tensor& add) { return decayed_sum(s, gamma(), add); }

ForwardStates StateExchange::first_rank(const Tensor& local, const std::optional<Tensor>& initial_state) {
  ForwardStates f;
  f.s_in = at::empty_like(local);
  f.zero_in = !initial_state.has_value();
  if (f.zero_in) {
    f.s_in.zero_();
    f.s_out = local;
  } else {
    f.s_in.copy_(*initial_state);
    f.s_out = update(f.s_in, local);
  }
  return f;
}

ForwardStates StateExchange::from_prefix(const Tensor& local, const Tensor& before,
                                         const std::optional<Tensor>& initial_state) {
  ForwardStates f;
  if (ring_.is_first()) {
    f.zero_in = !initial_state.has_value();
    f.s_in = f.zero_in ? at::zeros_like(local) : initial_state->clone(at::MemoryFormat::Contiguous);
    f.s_out = local;  // gamma^n init + L_0, folded by the caller
  } else {
    f.s_in = before;
    f.s_out = update(f.s_in, local);
  }
  return f;
}

StateExchange::Suffix StateExchange::from_suffix(const Tensor& x, const Tensor& after) {
  Suffix s;
  if (ring_.is_last()) {
    s.g_prev = x;
  } else {
    s.g_next = after;
    s.g_prev = update(s.g_next, x);
  }
  return s;
}

BackwardStates StateExchange::backward(Tensor m, const Tensor& g_user, const std::function<void()>& overlap) {
  if (gamma_before_waits_) gamma();
  // X_r = gamma^n U_r + M_r: what leaves this rank (U_r is part of G_r, which gamma^n scales).
  const Tensor x = g_user.defined() ? update(g_user, m) : m;
  Suffix s = backward_exchange(x, overlap);
  BackwardStates b;
  b.g_prev = s.g_prev;
  // G_r = U_r + G_in(r + 1)
  if (s.g_next.defined()) {
    b.g = g_user.defined() ? s.g_next + g_user : s.g_next;
  } else if (g_user.defined()) {
    b.g = g_user;
  }
  return b;
}

std::unique_ptr<StateExchange> make_exchange(const Kernels& backend, const Ring& ring, Strategy strategy,
                                             const Tensor& q, int64_t D, int64_t E, const Tensor& decay_acc,
                                             int64_t n, const Tensor& gate_sum, int64_t scan_nodes) {
  if (use_peer(backend, ring, strategy, q, D, E, gate_sum.defined())) {
    return std::make_unique<PeerRing>(ring, decay_acc, n, gate_sum, backend.peer_hop);
  }
  if (strategy == Strategy::AllGather) return std::make_unique<AllGather>(ring, decay_acc, n, gate_sum);
  if (strategy == Strategy::Scan) return std::make_unique<C10dScan>(ring, decay_acc, n, gate_sum, scan_nodes);
  return std::make_unique<C10dRing>(ring, decay_acc, n, gate_sum);
}

struct PeerTransport {
  std::function<void(const PeerHop&)> hop;
  std::function<bool(const Ring&, const at::Device&, int64_t, bool)> ready;
};

PeerTransport& peer_transport(c10::DeviceType type) {
  static PeerTransport t[static_cast<int>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)];
  return t[static_cast<int>(type)];
}

bool register_peer_transport(c10::DeviceType type, std::function<void(const PeerHop&)> hop,
                             std::function<bool(const Ring&, const at::Device&, int64_t, bool)> ready) {
  peer_transport(type) = PeerTransport{std::move(hop), std::move(ready)};
  return true;
}

std::unique_ptr<StateExchange> make_map_exchange(const Ring& ring, Strategy strategy, Tensor transition,
                                                 const Tensor& like, int64_t scan_nodes) {
  std::unique_ptr<StateExchange> ex;
  const PeerTransport& pt = peer_transport(like.device().type());
  const bool peer = ring_transport() == Transport::Peer && strategy == Strategy::Ring && ring.size() > 1 &&
                    like.scalar_type() == at::kFloat && pt.hop && pt.ready &&
                    pt.ready(ring, like.device(), like.numel(), /*required=*/true);
  if (peer) {
    ex = std::make_unique<PeerMapRing>(ring, pt.hop);
  } else if (strategy == Strategy::AllGather) {
    ex = std::make_unique<AllGather>(ring, Tensor(), 0, Tensor());
  } else if (strategy == Strategy::Scan) {
    ex = std::make_unique<C10dScan>(ring, Tensor(), 0, Tensor(), scan_nodes);
  } else {
    ex = std::make_unique<C10dRing>(ring, Tensor(), 0, Tensor());
  }
  ex->set_transition(std::move(transition));
  return ex;
}

}  // namespace lasp
