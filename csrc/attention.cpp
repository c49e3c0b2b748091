#include "attention.h"

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>

#include "exchange.h"
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

Tensor state_like(const Tensor& q, int64_t D, int64_t E) {
  return at::empty({q.size(0), q.size(1), D, E}, q.options().dtype(acc_type(q.scalar_type())));
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

  // Several ranks (exchange.h): the local state L_r (reads k and v only), the exchange that gives the
  // incoming state S_in, then the main pass with S_in, as on one device.
  const Tensor ws = kernels.workspace ? kernels.workspace(p, /*backward=*/false) : Tensor();
  Tensor local = state_like(q, D, E);
  p.state_out = local.data_ptr();
  kernels.fwd_local(p);  // L_r
  const ForwardStates st =
      make_exchange(backend_kernels, ring, strategy, q, D, E, decay_acc, N)->forward(local, initial_state);
  p.state_in = st.zero_in ? nullptr : st.s_in.data_ptr();
  p.state_out = nullptr;
  p.local_ready = true;
  // Across ranks the backward computes the segment states again (bwd_prepare, beside the gradient
  // exchange): they are kept on one device only (this path has not yet run with them on GPUs).
  kernels.fwd(p);  // o, with the incoming state
  return {o, st.s_out, st.s_in};
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

  // Several ranks, the mirror of the forward (exchange.h): the local M_r (reads q and dout only), the
  // exchange that gives G_r, the gradient w.r.t. this piece's outgoing state (with U_r, the gradient of
  // the state this rank returned, folded in), then the main pass with G_r. bwd_prepare (the rest of the
  // work that needs neither G nor M) runs during the exchange, beside the communication where it can.
  const Tensor ws = kernels.workspace ? kernels.workspace(p, /*backward=*/true) : Tensor();
  Tensor m = state_like(q, D, E);
  p.grad_state_in = m.data_ptr();
  kernels.bwd_local(p);  // M_r
  p.grad_state_in = nullptr;
  const BackwardStates st = make_exchange(backend_kernels, ring, strategy, q, D, E, decay_acc, N)
                                ->backward(m, g_user, [&] { kernels.bwd_prepare(p); });
  p.grad_state_out = ptr_or_null(st.g);
  p.local_ready = true;
  kernels.bwd(p);  // dq, dk, dv with G_r
  // Only the first piece reads the user's initial state.
  Tensor grad_init = ring.is_first() ? st.g_prev : at::zeros_like(st.g_prev);
  return {dq, dk, dv, grad_init};
}

}  // namespace lasp
