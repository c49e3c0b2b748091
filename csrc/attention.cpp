#include "attention.h"

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>

#include "ring.h"

namespace lasp {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

ScalarType to_lasp(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarType::Float32;
    case at::kHalf: return ScalarType::Float16;
    case at::kBFloat16: return ScalarType::BFloat16;
    case at::kDouble: return ScalarType::Float64;
    default: TORCH_CHECK_TYPE(false, "lasp_attention: unsupported dtype ", t);
  }
}

TensorView4 view4(const Tensor& t) {
  TensorView4 v;
  v.ptr = t.data_ptr();
  for (int i = 0; i < 4; ++i) v.stride[i] = t.stride(i);
  return v;
}

void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Params shared by forward and backward: sizes, dtype, q/k/v views, decay, scale.
AttnParams base_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& decay_acc, double scale) {
  AttnParams p;
  p.dtype = to_lasp(q.scalar_type());
  p.B = q.size(0);
  p.H = q.size(1);
  p.N = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.E = v.size(3);
  p.scale = scale;
  p.decay = ptr_or_null(decay_acc);
  p.q = view4(q);
  p.k = view4(k);
  p.v = view4(v);
  return p;
}

// The rates in the accumulation type (the caller's tensor itself when it already is: no copy). The kernels
// clamp +inf themselves (finite_rate, lasp_params.h); clamp: also here, for the ring's powers computed with
// ATen ops (gamma^n of each piece), where exp(-inf * 0) would be NaN. A NaN rate stays NaN and poisons its
// own head only, as a PyTorch op would.
Tensor decay_in_acc(const std::optional<Tensor>& decay, at::ScalarType acc, bool clamp) {
  if (!decay.has_value()) return Tensor();
  Tensor d = decay->to(acc).contiguous();
  return clamp ? d.clamp_max(1e30) : d;
}

// gamma^n per head, shaped (1, H, 1, 1) to scale a (B, H, D, E) state; undefined when there is no decay.
Tensor decay_pow(const Tensor& decay_acc, int64_t n) {
  if (!decay_acc.defined()) return Tensor();
  return at::exp(decay_acc * static_cast<double>(-n)).view({1, -1, 1, 1});
}

// gamma^n * s + add (gamma = 1 when there is no decay).
Tensor decayed_sum(const Tensor& s, const Tensor& gamma_n, const Tensor& add) {
  return gamma_n.defined() ? at::addcmul(add, s, gamma_n) : s + add;
}

Tensor state_like(const Tensor& q, int64_t D, int64_t E) {
  return at::empty({q.size(0), q.size(1), D, E}, q.options().dtype(acc_type(q.scalar_type())));
}

// gamma^n per head as an (H,) tensor (ones without decay): what the all-gather strategy exchanges.
Tensor decay_pow_h(const Tensor& decay_acc, int64_t n, int64_t H, const at::TensorOptions& opts) {
  if (!decay_acc.defined()) return at::ones({H}, opts);
  return at::exp(decay_acc * static_cast<double>(-n));
}

// What a rank contributes to the all-gather strategy: its (B, H, D, E) state, flattened, then gamma^n per head.
Tensor pack_state(const Tensor& x, const Tensor& decay_acc, int64_t n) {
  return at::cat({x.flatten(), decay_pow_h(decay_acc, n, x.size(1), x.options())});
}

// LASP-2's combination of the gathered packs of ranks j = first, first + step, ... (not `end`):
// s = gamma^n_j s + X_j from s = 0 (forward: the prefix before a rank; backward: the suffix after it).
Tensor combine_packs(const std::vector<Tensor>& all, const Tensor& like, int first, int end, int step) {
  const int64_t numel = like.numel(), H = like.size(1);
  Tensor s = at::zeros_like(like);
  for (int j = first; j != end; j += step) {
    s = at::addcmul(all[j].narrow(0, 0, numel).view_as(like), s, all[j].narrow(0, numel, H).view({1, -1, 1, 1}));
  }
  return s;
}

// gamma^n per head, made on first use (undefined without decay): the NCCL ring makes it before its waits,
// the peer hop computes it inside its kernel and never asks.
class LazyDecayPow {
 public:
  LazyDecayPow(const Tensor& decay_acc, int64_t n) : decay_acc_(decay_acc), n_(n) {}
  const Tensor& operator()() {
    if (!value_.defined() && decay_acc_.defined()) value_ = decay_pow(decay_acc_, n_);
    return value_;
  }

 private:
  const Tensor& decay_acc_;
  int64_t n_;
  Tensor value_;
};

enum class Strategy : int64_t { Ring = 0, AllGather = 1 };

Strategy parse_strategy(const std::string& s) {
  if (s == "ring") return Strategy::Ring;
  if (s == "allgather") return Strategy::AllGather;
  TORCH_CHECK_VALUE(false, "lasp_attention: strategy must be 'ring' or 'allgather', got '", s, "'");
}

// Whether this call's ring uses the peer-memory hop. Decided from what every rank of the group shares
// (the backend, the strategy, the dtype, the state size and the process-wide transport), never from the
// piece's length, so that the ranks agree.
bool use_peer(const Kernels& backend_kernels, const Ring& ring, Strategy strategy, const Tensor& q, int64_t D,
              int64_t E) {
  const Transport t = ring_transport();
  if (t == Transport::Nccl || strategy != Strategy::Ring || ring.size() <= 1 || !backend_kernels.peer_ready ||
      acc_type(q.scalar_type()) != at::kFloat) {
    return false;
  }
  if (t == Transport::Auto && !ring.backend_is_nccl()) return false;
  return backend_kernels.peer_ready(ring, q.device(), q.size(0) * q.size(1) * D * E, t == Transport::Peer);
}

// With group checks on: every rank compares what it was called with (one small all-gather).
void check_group_call(const Ring& ring, const Tensor& q, const Tensor& k, const Tensor& v, bool has_decay,
                      Strategy strategy, int64_t pass) {
  if (!ring.checks_on()) return;
  ring.check_same_call({{"batch size", q.size(0)},
                        {"q heads", q.size(1)},
                        {"kv heads", k.size(1)},
                        {"head dim D", q.size(3)},
                        {"value dim E", v.size(3)},
                        {"dtype", static_cast<int64_t>(q.scalar_type())},
                        {"strategy (0 ring, 1 allgather)", static_cast<int64_t>(strategy)},
                        {"decay given", has_decay ? 1 : 0},
                        {"ring transport (0 nccl, 1 peer, 2 auto)", static_cast<int64_t>(ring_transport())},
                        {"pass (0 forward, 1 backward)", pass}},
                       pass == 0 ? "the forward call" : "the backward call", q.device());
}

// N == 0 (an empty piece, e.g. a rank holding no tokens): no kernel runs; the states pass through
// (state_out = S_in, grad_state_in = G) so the ring and the returned states stay exact.
Kernels empty_piece_kernels(const Tensor& q, int64_t D, int64_t E) {
  const auto opts = q.options().dtype(acc_type(q.scalar_type()));
  const std::vector<int64_t> shape{q.size(0), q.size(1), D, E};
  auto pass = [opts, shape](const void* in, void* out) {
    if (out == nullptr) return;
    Tensor dst = at::from_blob(out, shape, opts);
    if (in == nullptr) {
      dst.zero_();
    } else {
      dst.copy_(at::from_blob(const_cast<void*>(in), shape, opts));
    }
  };
  return Kernels{[pass](AttnParams& p) { pass(p.state_in, p.state_out); },
                 [pass](AttnParams& p) { pass(nullptr, p.state_out); },
                 [pass](AttnParams& p) { pass(p.grad_state_out, p.grad_state_in); },
                 [pass](AttnParams& p) { pass(nullptr, p.grad_state_in); }, [](AttnParams&) {}, nullptr, nullptr, nullptr, nullptr};
}

}  // namespace

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& decay,
                  const std::optional<Tensor>& initial_state, bool check_values) {
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), "lasp_attention: q, k and v must be tensors");
  TORCH_CHECK_VALUE(q.dim() == 4, "lasp_attention: q must be 4-D (batch, heads, tokens, head dim), got a ",
                    q.dim(), "-D tensor of shape ", q.sym_sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "lasp_attention: k must be 4-D (batch, kv heads, tokens, head dim), got a ",
                    k.dim(), "-D tensor of shape ", k.sym_sizes());
  TORCH_CHECK_VALUE(v.dim() == 4, "lasp_attention: v must be 4-D (batch, kv heads, tokens, value dim), got a ",
                    v.dim(), "-D tensor of shape ", v.sym_sizes());
  TORCH_CHECK_TYPE(supported_dtype(q.scalar_type()),
                   "lasp_attention: q must be float32, float16, bfloat16 or float64, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "lasp_attention: k must have the dtype of q (",
                   q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), "lasp_attention: v must have the dtype of q (",
                   q.scalar_type(), "), got ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device(), "lasp_attention: k must be on the device of q (", q.device(),
                    "), got ", k.device());
  TORCH_CHECK_VALUE(v.device() == q.device(), "lasp_attention: v must be on the device of q (", q.device(),
                    "), got ", v.device());

  const auto& B = q.sym_size(0);
  const auto& H = q.sym_size(1);
  const auto& N = q.sym_size(2);
  const auto& D = q.sym_size(3);
  const auto& Hkv = k.sym_size(1);
  const auto& E = v.sym_size(3);
  TORCH_SYM_CHECK(k.sym_size(0).sym_eq(B), "lasp_attention: k must have the batch size of q (", B, "), got ",
                  k.sym_size(0));
  TORCH_SYM_CHECK(v.sym_size(0).sym_eq(B), "lasp_attention: v must have the batch size of q (", B, "), got ",
                  v.sym_size(0));
  TORCH_SYM_CHECK(k.sym_size(2).sym_eq(N), "lasp_attention: k must have the sequence length of q (", N,
                  " tokens), got ", k.sym_size(2));
  TORCH_SYM_CHECK(v.sym_size(2).sym_eq(N), "lasp_attention: v must have the sequence length of q (", N,
                  " tokens), got ", v.sym_size(2));
  TORCH_SYM_CHECK(k.sym_size(3).sym_eq(D), "lasp_attention: k must have the head dim of q (", D, "), got ",
                  k.sym_size(3));
  TORCH_SYM_CHECK(v.sym_size(1).sym_eq(Hkv), "lasp_attention: v must have the number of kv heads of k (", Hkv,
                  "), got ", v.sym_size(1));
  TORCH_SYM_CHECK(Hkv.sym_ge(1), "lasp_attention: k must have at least one head");
  TORCH_SYM_CHECK((H % Hkv).sym_eq(0), "lasp_attention: the number of q heads (", H,
                  ") must be a multiple of the number of k/v heads (", Hkv, ")");
  TORCH_SYM_CHECK(D.sym_ge(1), "lasp_attention: q must have a head dim of at least 1");
  TORCH_SYM_CHECK(E.sym_ge(1), "lasp_attention: v must have a head dim of at least 1");

  if (decay.has_value()) {
    const Tensor& d = *decay;
    TORCH_CHECK_VALUE(d.dim() == 1, "lasp_attention: decay must be 1-D with one rate per q head (", H,
                      "), got shape ", d.sym_sizes());
    TORCH_SYM_CHECK(d.sym_size(0).sym_eq(H), "lasp_attention: decay must have one rate per q head (", H,
                    "), got ", d.sym_size(0));
    TORCH_CHECK_TYPE(at::isFloatingType(d.scalar_type()), "lasp_attention: decay must be a floating tensor, got ",
                     d.scalar_type());
    TORCH_CHECK_VALUE(d.device() == q.device(), "lasp_attention: decay must be on the device of q (", q.device(),
                      "), got ", d.device());
    if (check_values && d.device().is_cpu()) {
      TORCH_CHECK_VALUE(!(d < 0).any().item<bool>(),
                        "lasp_attention: decay must hold rates >= 0 (gamma = exp(-decay) <= 1), got ", d);
    }
  }
  if (initial_state.has_value()) {
    const Tensor& s = *initial_state;
    const auto acc = acc_type(q.scalar_type());
    TORCH_CHECK_TYPE(s.scalar_type() == acc, "lasp_attention: initial_state must be ", acc, " for ",
                     q.scalar_type(), " inputs, got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.device() == q.device(), "lasp_attention: initial_state must be on the device of q (",
                      q.device(), "), got ", s.device());
    TORCH_CHECK_VALUE(s.dim() == 4, "lasp_attention: initial_state must have shape (B, H, D, E) = (", B, ", ", H,
                      ", ", D, ", ", E, "), got ", s.sym_sizes());
    TORCH_SYM_CHECK(s.sym_size(0).sym_eq(B) & s.sym_size(1).sym_eq(H) & s.sym_size(2).sym_eq(D) &
                        s.sym_size(3).sym_eq(E),
                    "lasp_attention: initial_state must have shape (B, H, D, E) = (", B, ", ", H, ", ", D, ", ",
                    E, "), got ", s.sym_sizes());
  }
}

Tensor alloc_out(const Tensor& like, const c10::SymInt& last) {
  const auto& B = like.sym_size(0);
  const auto& H = like.sym_size(1);
  const auto& N = like.sym_size(2);
  const bool tokens_outer = like.sym_stride(1) < like.sym_stride(2);
  if (tokens_outer) {
    return at::empty_symint({B, N, H, last}, like.options()).transpose(1, 2);
  }
  return at::empty_symint({B, H, N, last}, like.options());
}

namespace {
thread_local SegStates* tl_seg_request = nullptr;
thread_local const SegStates* tl_seg_provide = nullptr;

size_t acc_bytes(at::ScalarType t) { return acc_type(t) == at::kDouble ? 8 : 4; }

// The forward's workspace becomes the kept segment states when the caller asked and there are segments.
Tensor seg_states_workspace(const Kernels& kernels, AttnParams& p, SegStates* keep, int64_t& nseg, int64_t& seglen) {
  if (!keep || !kernels.split || !kernels.workspace || !kernels.split(p, false, &nseg, &seglen) || nseg <= 1) {
    return Tensor();
  }
  return kernels.workspace(p, /*backward=*/false);
}
}  // namespace

SegStatesRequest::SegStatesRequest(SegStates* target) { tl_seg_request = target; }
SegStatesRequest::~SegStatesRequest() { tl_seg_request = nullptr; }
SegStatesProvide::SegStatesProvide(const SegStates* states) { tl_seg_provide = states; }
SegStatesProvide::~SegStatesProvide() { tl_seg_provide = nullptr; }

std::tuple<Tensor, Tensor, Tensor> attention_fwd(const Kernels& backend_kernels, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const std::optional<Tensor>& decay,
                                                 double scale, const std::optional<Tensor>& initial_state,
                                                 const std::optional<std::string>& group_name,
                                                 const std::string& strategy_name) {
  SegStates* const keep = std::exchange(tl_seg_request, nullptr);
  check_inputs(q, k, v, decay, initial_state, /*check_values=*/true);
  const Strategy strategy = parse_strategy(strategy_name);
  const auto acc = acc_type(q.scalar_type());
  const int64_t N = q.size(2), D = q.size(3), E = v.size(3);
  const Kernels kernels = N == 0 ? empty_piece_kernels(q, D, E) : backend_kernels;
  const Ring ring(group_name);
  const Tensor decay_acc = decay_in_acc(decay, acc, /*clamp=*/ring.size() > 1);
  Tensor o = alloc_out(q, E);
  AttnParams p = base_params(q, k, v, decay_acc, scale);
  p.o = view4(o);

  check_group_call(ring, q, k, v, decay.has_value(), strategy, 0);
  if (ring.size() == 1) {
    // Alone: the incoming state is the user's initial state; one fused pass.
    // A copy, not a view: the op's outputs never alias its inputs (the saved state is an output).
    // No initial state: a 0-element state_in (zero; attention.h) without a group, zeros under a group of
    // one rank (the shape fwd_meta gives either way).
    Tensor s_in = fwd_saves_no_state(initial_state, group_name) ? at::empty({0}, q.options().dtype(acc))
                  : initial_state.has_value() ? initial_state->clone(at::MemoryFormat::Contiguous)
                                              : at::zeros_like(state_like(q, D, E));
    Tensor s_out = state_like(q, D, E);
    p.state_in = initial_state.has_value() ? s_in.data_ptr() : nullptr;
    p.state_out = s_out.data_ptr();
    int64_t nseg = 0, seglen = 0;
    const Tensor ws = seg_states_workspace(kernels, p, keep, nseg, seglen);
    kernels.fwd(p);
    if (ws.defined()) *keep = SegStates{ws, nseg, seglen};
    return {o, s_out, s_in};
  }

  // Several ranks (docs/design.md, "Across ranks"): the local state L_r first (reads k and v only), then the
  // incoming state S_in from the other ranks, then the main pass with S_in, as on one device.
  // Ring: receive S_in, send gamma^n S_in + L_r on (one small update per hop). All-gather (LASP-2):
  // one all-gather of (L_j, gamma^n_j); each rank combines its prefix itself.
  //
  // Communication kernels never run beside the compute kernels (they would take SMs from grids sized
  // in whole waves): receives are posted after the local pass, and the main pass waits for the send.
  const Tensor ws = kernels.workspace ? kernels.workspace(p, /*backward=*/false) : Tensor();
  Tensor s_in = state_like(q, D, E);
  Tensor local = state_like(q, D, E);
  p.state_out = local.data_ptr();
  kernels.fwd_local(p);  // L_r
  const bool peer = use_peer(backend_kernels, ring, strategy, q, D, E);
  c10::intrusive_ptr<c10d::Work> recv;
  if (strategy == Strategy::Ring && !peer && !ring.is_first()) recv = ring.recv_prev(s_in, Ring::kForwardTag);
  LazyDecayPow gamma(decay_acc, N);
  if (!peer) gamma();  // before any wait: each NCCL hop's critical path is one update
  Tensor s_out;
  bool zero_in = false;  // S_in is exactly zero (first rank without an initial state)
  if (strategy == Strategy::AllGather) {
    // The first rank folds the initial state into what it contributes (its S_out).
    if (ring.is_first() && initial_state.has_value()) local = decayed_sum(*initial_state, gamma(), local);
    Tensor pack = pack_state(local, decay_acc, N);
    const auto all = ring.allgather(pack, "the all-gather of the local states");
    s_in = combine_packs(all, local, 0, ring.rank(), 1);
    if (ring.is_first()) {
      zero_in = !initial_state.has_value();
      if (!zero_in) s_in.copy_(*initial_state);
      s_out = local;  // gamma^n init + L_0, folded above
    } else {
      s_out = decayed_sum(s_in, gamma(), local);
    }
  } else {
    if (ring.is_first()) {
      zero_in = !initial_state.has_value();
      if (zero_in) {
        s_in.zero_();
        s_out = local;
      } else {
        s_in.copy_(*initial_state);
        s_out = decayed_sum(s_in, gamma(), local);
      }
    } else if (peer) {
      s_out = state_like(q, D, E);  // filled by the hop
    } else {
      ring.wait(recv, "receiving the state from the previous rank");
      s_out = decayed_sum(s_in, gamma(), local);  // gamma^n S_in + L_r
    }
    if (peer) {  // receive S_in, S_out = gamma^n S_in + L_r, send S_out on: one kernel
      PeerHop h(ring, 0, decay_acc, N, "the forward state ring (peer transport)");
      h.add = ring.is_first() ? s_out : local;
      h.in_copy = s_in;
      h.out = s_out;
      backend_kernels.peer_hop(h);
    }
  }
  if (strategy == Strategy::Ring && !peer && !ring.is_last()) {
    ring.wait(ring.send_next(s_out, Ring::kForwardTag), "sending the state to the next rank");
  }
  p.state_in = zero_in ? nullptr : s_in.data_ptr();
  p.state_out = nullptr;
  p.local_ready = true;
  // Across ranks the backward computes the segment states again (bwd_prepare, beside the gradient
  // exchange): they are kept on one device only (this path has not yet run with them on GPUs).
  kernels.fwd(p);  // o, with the incoming state
  return {o, s_out, s_in};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd(const Kernels& backend_kernels, const Tensor& q,
                                                         const Tensor& k, const Tensor& v, const Tensor& dout,
                                                         const std::optional<Tensor>& grad_final_state,
                                                         const std::optional<Tensor>& decay, double scale,
                                                         const Tensor& state_in,
                                                         const std::optional<std::string>& group_name,
                                                         const std::string& strategy_name) {
  const SegStates* const given = std::exchange(tl_seg_provide, nullptr);
  check_inputs(q, k, v, decay, std::nullopt, /*check_values=*/false);
  const Strategy strategy = parse_strategy(strategy_name);
  const auto acc = acc_type(q.scalar_type());
  const int64_t N = q.size(2), D = q.size(3), E = v.size(3);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({q.size(0), q.size(1), N, E}) && dout.scalar_type() == q.scalar_type(),
              "lasp_attention backward: the output gradient must have shape ", at::IntArrayRef({q.size(0), q.size(1), N, E}),
              " and dtype ", q.scalar_type(), ", got ", dout.sizes(), " ", dout.scalar_type());
  TORCH_CHECK_VALUE(state_in.numel() == 0 || state_in.sizes() == at::IntArrayRef({q.size(0), q.size(1), D, E}),
                    "lasp_attention backward: state_in must be the forward's third output, of shape (B, H, D, E) = ",
                    at::IntArrayRef({q.size(0), q.size(1), D, E}), " or with 0 elements (no incoming state), got ",
                    state_in.sizes());
  TORCH_CHECK_VALUE(state_in.numel() == 0 || state_in.device() == q.device(),
                    "lasp_attention backward: state_in must be on the device of q (", q.device(), "), got ",
                    state_in.device());
  const Kernels kernels = N == 0 ? empty_piece_kernels(q, D, E) : backend_kernels;
  const Ring ring(group_name);
  const Tensor decay_acc = decay_in_acc(decay, acc, /*clamp=*/ring.size() > 1);
  const Tensor s_in = state_in.to(acc).contiguous();  // 0 elements: a zero incoming state
  const Tensor g_user = grad_final_state.has_value() ? grad_final_state->to(acc).contiguous() : Tensor();

  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AttnParams p = base_params(q, k, v, decay_acc, scale);
  p.dout = view4(dout);
  p.dq = view4(dq);
  p.dk = view4(dk);
  p.dv = view4(dv);
  p.state_in = s_in.numel() > 0 ? s_in.data_ptr() : nullptr;
  if (given && given->states.defined() && kernels.split) {  // the forward's segment states, if they fit
    int64_t nseg = 0, seglen = 0;
    const size_t need = (size_t)(q.size(0) * q.size(1) * given->nseg * D * E) * acc_bytes(q.scalar_type());
    if (kernels.split(p, true, &nseg, &seglen) && nseg == given->nseg && seglen == given->seglen &&
        given->states.device() == q.device() && given->states.nbytes() >= need) {
      p.seg_states = given->states.data_ptr();
    }
  }

  check_group_call(ring, q, k, v, decay.has_value(), strategy, 1);
  if (ring.size() == 1) {
    // Alone: G is the gradient of the returned final state; one fused pass.
    Tensor grad_init = state_like(q, D, E);
    p.grad_state_out = ptr_or_null(g_user);
    p.grad_state_in = grad_init.data_ptr();
    kernels.bwd(p);
    return {dq, dk, dv, grad_init};
  }

  // Several ranks, the mirror of the forward: the local M_r first (reads q and dout only), then G_r, the
  // gradient w.r.t. this piece's outgoing state, from the later ranks, then the main pass with G_r.
  // With U_r the gradient of the state this rank returned: G_r = U_r + (gradient arriving from rank r+1)
  // and the gradient w.r.t. its incoming state is gamma^n G_r + M_r.
  // Ring: receive from r+1, send gamma^n G_r + M_r to r-1. All-gather: X_j = gamma^n_j U_j + M_j of every
  // rank; rank r's G_r = U_r + sum over j > r of the decayed X_j (suffix combination).
  // bwd_prepare (the rest of the work that needs neither G nor M) runs while the gradients travel.
  const Tensor ws = kernels.workspace ? kernels.workspace(p, /*backward=*/true) : Tensor();
  Tensor g_next = state_like(q, D, E);  // gradient arriving from the later ranks
  Tensor m = state_like(q, D, E);
  p.grad_state_in = m.data_ptr();
  kernels.bwd_local(p);  // M_r
  const bool peer = use_peer(backend_kernels, ring, strategy, q, D, E);
  LazyDecayPow gamma(decay_acc, N);
  if (!peer) gamma();
  if (g_user.defined()) m = decayed_sum(g_user, gamma(), m);  // gamma^n U_r + M_r
  p.grad_state_in = nullptr;
  Tensor g_prev;  // gradient w.r.t. this piece's incoming state
  bool zero_next = false;  // nothing arrives from later ranks (the last rank)
  if (strategy == Strategy::AllGather) {
    Tensor pack = pack_state(m, decay_acc, N);
    std::vector<std::vector<Tensor>> gathered;
    auto work = ring.allgather_start(pack, gathered);
    kernels.bwd_prepare(p);  // beside the all-gather
    ring.wait(work, "the all-gather of the local state gradients");
    g_next = combine_packs(gathered[0], m, ring.size() - 1, ring.rank(), -1);
    zero_next = ring.is_last();
    g_prev = zero_next ? m : decayed_sum(g_next, gamma(), m);
  } else if (peer) {
    // The last rank sends M before its prepare pass; the others receive, update and send on after it.
    PeerHop h(ring, 1, decay_acc, N, "the backward state ring (peer transport)");
    h.add = m;
    zero_next = ring.is_last();
    if (zero_next) {
      g_prev = m;
      backend_kernels.peer_hop(h);
      kernels.bwd_prepare(p);
    } else {
      kernels.bwd_prepare(p);
      g_prev = state_like(q, D, E);
      h.in_copy = g_next;
      h.out = g_prev;  // gamma^n (G_next + U) + M
      backend_kernels.peer_hop(h);
    }
  } else if (ring.is_last()) {
    zero_next = true;
    g_prev = m;
    c10::intrusive_ptr<c10d::Work> send;
    if (!ring.is_first()) send = ring.send_prev(g_prev, Ring::kBackwardTag);
    kernels.bwd_prepare(p);
    if (send) ring.wait(send, "sending the state gradient to the previous rank");
  } else {
    auto recv = ring.recv_next(g_next, Ring::kBackwardTag);
    kernels.bwd_prepare(p);
    ring.wait(recv, "receiving the state gradient from the next rank");
    g_prev = decayed_sum(g_next, gamma(), m);  // gamma^n (G_next + U) + M
    if (!ring.is_first()) {
      ring.wait(ring.send_prev(g_prev, Ring::kBackwardTag), "sending the state gradient to the previous rank");
    }
  }
  Tensor g;  // G_r = U_r + G_next
  if (!zero_next) g = g_user.defined() ? g_next + g_user : g_next;
  else if (g_user.defined()) g = g_user;
  p.grad_state_out = ptr_or_null(g);
  p.local_ready = true;
  kernels.bwd(p);  // dq, dk, dv with G_r
  // Only the first piece reads the user's initial state.
  Tensor grad_init = ring.is_first() ? g_prev : at::zeros_like(g_prev);
  return {dq, dk, dv, grad_init};
}

}  // namespace lasp
