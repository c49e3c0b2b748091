// Op registration: schemas (once), CPU and Meta kernels, the C++ autograd function under the Autograd key.
//
//   lasp::lasp_attention      the user-facing op: (o, final_state); autograd through LaspAttentionFunction
//   lasp::lasp_attention_fwd  forward with the ring: (o, final_state, state_in)
//   lasp::lasp_attention_bwd  backward with the ring: (dq, dk, dv, grad_initial_state)
//   lasp::alibi_slopes        TransNormerLLM / Lightning Attention decay rates
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>

#include "attention.h"
#include "cpu/attention_cpu.h"
#include "lasp.h"
#include "ring.h"

namespace lasp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const Kernels& cpu_kernels() {
  static const Kernels k{cpu::fwd, cpu::fwd_local, cpu::bwd, cpu::bwd_local, cpu::bwd_prepare, nullptr, nullptr, nullptr, nullptr};
  return k;
}

std::tuple<Tensor, Tensor, Tensor> fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const std::optional<Tensor>& decay, double scale,
                                           const std::optional<Tensor>& initial_state,
                                           const std::optional<std::string>& group_name,
    const std::string& strategy) {
  return attention_fwd(cpu_kernels(), q, k, v, decay, scale, initial_state, group_name, strategy);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& dout, const std::optional<Tensor>& grad_final_state,
                                                   const std::optional<Tensor>& decay, double scale,
                                                   const Tensor& state_in,
                                                   const std::optional<std::string>& group_name,
    const std::string& strategy) {
  return attention_bwd(cpu_kernels(), q, k, v, dout, grad_final_state, decay, scale, state_in, group_name, strategy);
}

// ---- Meta kernels: shapes, dtypes and strides only (what torch.compile traces with) ----
Tensor state_meta(const Tensor& q, const Tensor& v) {
  return at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(3), v.sym_size(3)},
                          q.options().dtype(acc_type(q.scalar_type())));
}

std::tuple<Tensor, Tensor, Tensor> fwd_meta(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const std::optional<Tensor>& decay, double scale,
                                            const std::optional<Tensor>& initial_state,
                                            const std::optional<std::string>& group_name,
    const std::string& strategy) {
  check_inputs(q, k, v, decay, initial_state, /*check_values=*/false);
  // state_in: 0 elements without a group and without an initial state (attention.h)
  Tensor s_in = fwd_saves_no_state(initial_state, group_name)
                    ? at::empty({0}, q.options().dtype(acc_type(q.scalar_type())))
                    : state_meta(q, v);
  return {alloc_out(q, v.sym_size(3)), state_meta(q, v), s_in};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_meta(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& dout, const std::optional<Tensor>& grad_final_state,
                                                    const std::optional<Tensor>& decay, double scale,
                                                    const Tensor& state_in,
                                                    const std::optional<std::string>& group_name,
    const std::string& strategy) {
  check_inputs(q, k, v, decay, std::nullopt, /*check_values=*/false);
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v), state_meta(q, v)};
}

// ---- The user-facing op ----
std::tuple<Tensor, Tensor> call_fwd_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const std::optional<Tensor>& decay, double scale,
                                       const std::optional<Tensor>& initial_state,
                                       const std::optional<std::string>& group_name, const std::string& strategy,
                                       Tensor* state_in) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lasp::lasp_attention_fwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, double,
                           const std::optional<Tensor>&, const std::optional<std::string>&, const std::string&)>();
  auto [o, final_state, s_in] = op.call(q, k, v, decay, scale, initial_state, group_name, strategy);
  if (state_in) *state_in = s_in;
  return {o, final_state};
}

// Below autograd (and for inference): the forward op without the cached state.
std::tuple<Tensor, Tensor> attention_noautograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const std::optional<Tensor>& decay, double scale,
                                                const std::optional<Tensor>& initial_state,
                                                const std::optional<std::string>& group_name,
    const std::string& strategy) {
  return call_fwd_op(q, k, v, decay, scale, initial_state, group_name, strategy, nullptr);
}

class LaspAttentionFunction : public torch::autograd::Function<LaspAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const std::optional<Tensor>& decay, double scale,
                               const std::optional<Tensor>& initial_state,
                               const std::optional<std::string>& group_name,
    const std::string& strategy) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // An output the loss does not use (usually the final state) gets an undefined gradient instead of
    // a zero-filled (B, H, D, E) tensor that the kernels would then read: one fill and its bytes saved.
    ctx->set_materialize_grads(false);
    Tensor state_in;
    SegStates kept;  // the forward's segment states, for the backward (attention.h)
    auto [o, final_state] = [&] {
      const SegStatesRequest request(&kept);
      return call_fwd_op(q, k, v, decay, scale, initial_state, group_name, strategy, &state_in);
    }();
    if (kept.states.defined()) {
      ctx->saved_data["seg_states"] = kept.states;
      ctx->saved_data["seg_nseg"] = kept.nseg;
      ctx->saved_data["seg_seglen"] = kept.seglen;
    }
    ctx->save_for_backward({q, k, v, state_in, decay.has_value() ? *decay : Tensor()});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_initial_state"] = initial_state.has_value();
    if (group_name.has_value()) ctx->saved_data["group_name"] = *group_name;
    ctx->saved_data["strategy"] = strategy;
    return {o, final_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &state_in = saved[3];
    std::optional<Tensor> decay;
    if (saved[4].defined()) decay = saved[4];
    std::optional<std::string> group_name;
    if (ctx->saved_data.count("group_name")) group_name = ctx->saved_data["group_name"].toStringRef();
    const double scale = ctx->saved_data["scale"].toDouble();
    const std::string strategy = ctx->saved_data["strategy"].toStringRef();

    // An unused output has an undefined gradient; the ring still has to run on every rank.
    Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(alloc_out(q, v.sym_size(3)));
    std::optional<Tensor> grad_final;
    if (grads[1].defined()) grad_final = grads[1];

    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lasp::lasp_attention_bwd", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const std::optional<Tensor>&, const std::optional<Tensor>&, double, const Tensor&,
                             const std::optional<std::string>&, const std::string&)>();
    SegStates kept;
    if (ctx->saved_data.count("seg_states")) {
      kept.states = ctx->saved_data["seg_states"].toTensor();
      kept.nseg = ctx->saved_data["seg_nseg"].toInt();
      kept.seglen = ctx->saved_data["seg_seglen"].toInt();
    }
    auto [dq, dk, dv, dinit] = [&] {
      const SegStatesProvide provide(&kept);
      return op.call(q, k, v, dout, grad_final, decay, scale, state_in, group_name, strategy);
    }();
    const bool has_init = ctx->saved_data["has_initial_state"].toBool();
    return {dq, dk, dv, Tensor(), Tensor(), has_init ? dinit : Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& decay, double scale,
                                              const std::optional<Tensor>& initial_state,
                                              const std::optional<std::string>& group_name,
    const std::string& strategy) {
  TORCH_CHECK_VALUE(!(decay.has_value() && decay->requires_grad()),
                    "lasp_attention: decay is a constant of the op and takes no gradient; pass decay.detach()");
  auto out = LaspAttentionFunction::apply(q, k, v, decay, scale, initial_state, group_name, strategy);
  return {out[0], out[1]};
}

}  // namespace

void set_group_checks(std::optional<bool> enabled, std::optional<double> timeout_s) {
  TORCH_CHECK_VALUE(!timeout_s.has_value() || *timeout_s > 0, "set_group_checks: timeout_s must be > 0, got ",
                    *timeout_s);
  group_checks().enabled = enabled;
  group_checks().timeout.reset();
  if (timeout_s.has_value()) {
    group_checks().timeout = std::chrono::milliseconds(static_cast<int64_t>(*timeout_s * 1000));
  }
}

void set_ring_transport(const std::string& transport) {
  ring_transport() = parse_transport(transport, "set_ring_transport: transport");
}

std::string get_ring_transport() { return transport_name(ring_transport()); }

at::Tensor alibi_slopes(int64_t num_heads) {
  TORCH_CHECK_VALUE(num_heads >= 1, "alibi_slopes: num_heads must be >= 1, got ", num_heads);
  // 2^(-8/n)^(i+1) for a power of two n; otherwise the closest lower power of two, then every other
  // slope of twice that many heads (the ALiBi construction used by TransNormerLLM / Lightning Attention).
  auto pow2 = [](int64_t n) {
    std::vector<double> s(n);
    const double start = std::pow(2.0, -8.0 / static_cast<double>(n));
    for (int64_t i = 0; i < n; ++i) s[i] = std::pow(start, static_cast<double>(i + 1));
    return s;
  };
  int64_t closest = 1;
  while (closest * 2 <= num_heads) closest *= 2;
  std::vector<double> slopes = pow2(closest);
  if (closest < num_heads) {
    const auto extra = pow2(2 * closest);
    for (int64_t i = 0; static_cast<int64_t>(slopes.size()) < num_heads; i += 2) slopes.push_back(extra[i]);
  }
  return at::tensor(slopes, at::kDouble).to(at::kFloat);
}

}  // namespace lasp

TORCH_LIBRARY(lasp, m) {
  m.def(
      "lasp_attention(Tensor q, Tensor k, Tensor v, Tensor? decay, float scale, Tensor? initial_state, "
      "str? group_name, str strategy=\"ring\") -> (Tensor, Tensor)");
  m.def(
      "lasp_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? decay, float scale, Tensor? initial_state, "
      "str? group_name, str strategy=\"ring\") -> (Tensor, Tensor, Tensor)");
  m.def(
      "lasp_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor? grad_final_state, Tensor? decay, "
      "float scale, Tensor state_in, str? group_name, str strategy=\"ring\") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("set_group_checks(bool? enabled, float? timeout_s) -> ()", &lasp::set_group_checks);
  m.def("set_ring_transport(str transport) -> ()", &lasp::set_ring_transport);
  m.def("get_ring_transport() -> str", &lasp::get_ring_transport);
  m.def("alibi_slopes(int num_heads) -> Tensor", &lasp::alibi_slopes);
}

TORCH_LIBRARY_IMPL(lasp, CPU, m) {
  m.impl("lasp_attention_fwd", &lasp::fwd_cpu);
  m.impl("lasp_attention_bwd", &lasp::bwd_cpu);
}

TORCH_LIBRARY_IMPL(lasp, Meta, m) {
  m.impl("lasp_attention_fwd", &lasp::fwd_meta);
  m.impl("lasp_attention_bwd", &lasp::bwd_meta);
}

TORCH_LIBRARY_IMPL(lasp, CompositeExplicitAutograd, m) {
  m.impl("lasp_attention", &lasp::attention_noautograd);
}

TORCH_LIBRARY_IMPL(lasp, Autograd, m) {
  m.impl("lasp_attention", &lasp::attention_autograd);
}
