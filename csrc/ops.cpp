// Op registration: schemas (once), CPU and Meta kernels, the C++ autograd function under the Autograd key.
//
//   lasp::lasp_attention      the user-facing op: (o, final_state); autograd through LaspAttentionFunction
//   lasp::lasp_attention_fwd  forward with the ring: (o, final_state, state_in, seg_states)
//   lasp::lasp_attention_bwd  backward with the ring: (dq, dk, dv, grad_initial_state, dg), seg_states in
//   lasp::alibi_slopes        TransNormerLLM / Lightning Attention decay rates
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <atomic>
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
  static const Kernels k = [] {
    Kernels c{cpu::fwd, cpu::fwd_local, cpu::bwd, cpu::bwd_local, cpu::bwd_prepare, nullptr, nullptr, nullptr, nullptr};
    c.gates = c.head_maps = true;
    return c;
  }();
  return k;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const std::optional<Tensor>& decay, double scale,
                                                   const std::optional<Tensor>& initial_state,
                                                   const std::optional<std::string>& group_name,
                                                   const std::string& strategy, int64_t seg_nseg,
                                                   int64_t seg_seglen, const std::optional<Tensor>& g) {
  return attention_fwd(cpu_kernels(), q, k, v, decay, scale, initial_state, group_name, strategy, seg_nseg,
                       seg_seglen, g);
}

using BwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

BwdOut bwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
               const std::optional<Tensor>& grad_final_state, const std::optional<Tensor>& decay, double scale,
               const Tensor& state_in, const std::optional<std::string>& group_name, const std::string& strategy,
               const std::optional<Tensor>& seg_states, int64_t seg_seglen, const std::optional<Tensor>& g) {
  return attention_bwd(cpu_kernels(), q, k, v, dout, grad_final_state, decay, scale, state_in, group_name, strategy,
                       seg_states, seg_seglen, g);
}

// ---- Meta kernels: shapes, dtypes and strides only (what torch.compile traces with) ----
Tensor state_meta(const Tensor& q, const Tensor& v) {
  return at::empty_symint({q.sym_size(0), out_heads(q, v), q.sym_size(3), v.sym_size(3)},
                          q.options().dtype(acc_type(q.scalar_type())));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fwd_meta(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const std::optional<Tensor>& decay, double scale,
                                                    const std::optional<Tensor>& initial_state,
                                                    const std::optional<std::string>& group_name,
                                                    const std::string& strategy, int64_t seg_nseg,
                                                    int64_t seg_seglen, const std::optional<Tensor>& g) {
  check_inputs(q, k, v, decay, initial_state, /*check_values=*/false, g);
  check_seg_split_args(seg_nseg, seg_seglen);
  const auto acc_opts = q.options().dtype(acc_type(q.scalar_type()));
  // state_in: 0 elements without a group and without an initial state (attention.h)
  Tensor s_in = fwd_saves_no_state(initial_state, group_name) ? at::empty({0}, acc_opts) : state_meta(q, v);
  // seg_states: (B, H, seg_nseg, D, E) when kept, else 0 elements (whether the split fits is the device's to say)
  Tensor seg = seg_nseg > 1 ? at::empty_symint({q.sym_size(0), out_heads(q, v), c10::SymInt(seg_nseg), q.sym_size(3),
                                                v.sym_size(3)},
                                               acc_opts)
                            : at::empty({0}, acc_opts);
  return {alloc_out(out_layout_like(q, v), out_heads(q, v), v.sym_size(3)), state_meta(q, v), s_in, seg};
}

BwdOut bwd_meta(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                const std::optional<Tensor>& grad_final_state, const std::optional<Tensor>& decay, double scale,
                const Tensor& state_in, const std::optional<std::string>& group_name, const std::string& strategy,
                const std::optional<Tensor>& seg_states, int64_t seg_seglen, const std::optional<Tensor>& g) {
  check_inputs(q, k, v, decay, std::nullopt, /*check_values=*/false, g);
  check_seg_states(q, v, seg_states, seg_seglen);
  const auto acc_opts = q.options().dtype(acc_type(q.scalar_type()));
  Tensor dg = g.has_value() && g->scalar_type() != at::kBool
                  ? at::empty_symint({q.sym_size(0), out_heads(q, v), q.sym_size(2)}, acc_opts)
                  : at::empty({0}, acc_opts);
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v), state_meta(q, v), dg};
}

// ---- The user-facing op ----
using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;

FwdOut call_fwd_op(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& decay,
                   double scale, const std::optional<Tensor>& initial_state,
                   const std::optional<std::string>& group_name, const std::string& strategy, int64_t seg_nseg,
                   int64_t seg_seglen, const std::optional<Tensor>& g) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lasp::lasp_attention_fwd", "")
                       .typed<FwdOut(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     double, const std::optional<Tensor>&, const std::optional<std::string>&,
                                     const std::string&, int64_t, int64_t, const std::optional<Tensor>&)>();
  return op.call(q, k, v, decay, scale, initial_state, group_name, strategy, seg_nseg, seg_seglen, g);
}

// Below autograd (and for inference): the forward op, keeping nothing for a backward.
std::tuple<Tensor, Tensor> attention_noautograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                const std::optional<Tensor>& decay, double scale,
                                                const std::optional<Tensor>& initial_state,
                                                const std::optional<std::string>& group_name,
                                                const std::string& strategy, const std::optional<Tensor>& g) {
  auto out = call_fwd_op(q, k, v, decay, scale, initial_state, group_name, strategy, 0, 0, g);
  return {std::get<0>(out), std::get<1>(out)};
}

// Whether t's sizes, strides and offset are plain numbers and it has memory of its own: not a symbolic,
// fake, functional or meta tensor of a trace (torch.compile), where the forward's split cannot be asked.
bool concrete(const Tensor& t) {
  for (const auto& s : t.sym_sizes())
    if (s.is_symbolic()) return false;
  for (const auto& s : t.sym_strides())
    if (s.is_symbolic()) return false;
  if (t.sym_storage_offset().is_symbolic() || t.is_meta()) return false;
  return !t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// The split the forward op is to keep its segment states with: the device backend's (forward_split), for
// one rank (no group) and concrete inputs; (0, 0) otherwise or with one segment (nothing to keep).
std::pair<int64_t, int64_t> split_to_keep(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const std::optional<std::string>& group_name, bool gated) {
  if (group_name.has_value() || !concrete(q) || !concrete(k) || !concrete(v)) return {0, 0};
  int64_t nseg = 0, seglen = 0;
  if (!forward_split(q, k, v, gated, &nseg, &seglen) || nseg <= 1) return {0, 0};
  return {nseg, seglen};
}

class LaspAttentionFunction : public torch::autograd::Function<LaspAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const std::optional<Tensor>& decay, double scale,
                               const std::optional<Tensor>& initial_state,
                               const std::optional<std::string>& group_name,
                               const std::string& strategy, const std::optional<Tensor>& g) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // An output the loss does not use (usually the final state) gets an undefined gradient instead of
    // a zero-filled (B, H, D, E) tensor that the kernels would then read: one fill and its bytes saved.
    ctx->set_materialize_grads(false);
    // Long sequences on one rank: the forward keeps its segment input states and the backward takes them
    // (where its own split is the same) instead of computing them again.
    const auto [seg_nseg, seg_seglen] = split_to_keep(q, k, v, group_name, g.has_value());
    auto [o, final_state, state_in, seg_states] =
        call_fwd_op(q, k, v, decay, scale, initial_state, group_name, strategy, seg_nseg, seg_seglen, g);
    ctx->save_for_backward({q, k, v, state_in, decay.has_value() ? *decay : Tensor(),
                            seg_nseg > 1 ? seg_states : Tensor(), g.has_value() ? *g : Tensor()});
    ctx->saved_data["seg_seglen"] = seg_seglen;
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
    std::optional<Tensor> seg_states;  // the forward's segment states, if it kept them
    if (saved[5].defined()) seg_states = saved[5];
    std::optional<Tensor> g;
    if (saved[6].defined()) g = saved[6];
    const int64_t seg_seglen = ctx->saved_data["seg_seglen"].toInt();
    std::optional<std::string> group_name;
    if (ctx->saved_data.count("group_name")) group_name = ctx->saved_data["group_name"].toStringRef();
    const double scale = ctx->saved_data["scale"].toDouble();
    const std::string strategy = ctx->saved_data["strategy"].toStringRef();

    // An unused output has an undefined gradient; the ring still has to run on every rank.
    Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(alloc_out(out_layout_like(q, v), out_heads(q, v), v.sym_size(3)));
    std::optional<Tensor> grad_final;
    if (grads[1].defined()) grad_final = grads[1];

    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lasp::lasp_attention_bwd", "")
                         .typed<BwdOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                       const std::optional<Tensor>&, const std::optional<Tensor>&, double, const Tensor&,
                                       const std::optional<std::string>&, const std::string&,
                                       const std::optional<Tensor>&, int64_t, const std::optional<Tensor>&)>();
    auto [dq, dk, dv, dinit, dg] = op.call(q, k, v, dout, grad_final, decay, scale, state_in, group_name, strategy,
                                           seg_states, seg_seglen, g);
    const bool has_init = ctx->saved_data["has_initial_state"].toBool();
    return {dq,       dk,       dv,      Tensor(), Tensor(), has_init ? dinit : Tensor(), Tensor(), Tensor(),
            g.has_value() && g->scalar_type() != at::kBool ? dg.to(g->scalar_type()) : Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const std::optional<Tensor>& decay, double scale,
                                              const std::optional<Tensor>& initial_state,
                                              const std::optional<std::string>& group_name,
                                              const std::string& strategy, const std::optional<Tensor>& g) {
  TORCH_CHECK_VALUE(!(decay.has_value() && decay->requires_grad()),
                    "lasp_attention: decay is a constant of the op and takes no gradient; pass decay.detach() "
                    "(or learn per-token gates through g)");
  auto out = LaspAttentionFunction::apply(q, k, v, decay, scale, initial_state, group_name, strategy, g);
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

namespace {
std::atomic<bool>& value_checks_flag() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("LASP_CHECK_VALUES");
    return !(env != nullptr && std::string(env) == "0");
  }()};
  return on;
}
thread_local int64_t thread_value_mode = -1;  // thread_value_checks: -1 follow the process-wide setting
}  // namespace

void set_value_checks(bool enabled) { value_checks_flag().store(enabled); }
bool get_value_checks() { return thread_value_mode >= 0 ? thread_value_mode == 1 : value_checks_flag().load(); }
int64_t thread_value_checks(int64_t mode) {
  TORCH_CHECK_VALUE(mode >= -1 && mode <= 1, "_thread_value_checks: mode must be 1 (on), 0 (off) or -1 (follow "
                    "set_value_checks), got ", mode);
  const int64_t before = thread_value_mode;
  thread_value_mode = mode;
  return before;
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
  // g: per-token log gates (B, H, N), any floating dtype, with a gradient; or bool (B, H, N), document starts
  // of packed rows (True: the state is dropped before that token, as a log gate of -inf), with none (the
  // backward's dg has 0 elements and the autograd function returns no gradient for it). lasp_attention
  // (python) passes the starts of cu_seqlens so when no log gates come with them.
  m.def(
      "lasp_attention(Tensor q, Tensor k, Tensor v, Tensor? decay, float scale, Tensor? initial_state, "
      "str? group_name, str strategy=\"ring\", Tensor? g=None) -> (Tensor, Tensor)");
  // The forward: (o, final_state, state_in, seg_states). seg_nseg > 1 keeps the forward's segment input
  // states for the backward of the same call: (seg_nseg, seg_seglen) must be the split the forward uses
  // (lasp_cuda.h, fwd_split; else a ValueError saying which), and seg_states is then the acc-type
  // (B, H, seg_nseg, D, E) states at the segment starts (a view of the forward's workspace). Only on one
  // rank: with a group of more than one rank seg_nseg > 1 raises (across ranks the backward computes them
  // again), and on CPU too (no segments). seg_nseg 0 or 1: seg_states has 0 elements.
  m.def(
      "lasp_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? decay, float scale, Tensor? initial_state, "
      "str? group_name, str strategy=\"ring\", int seg_nseg=0, int seg_seglen=0, Tensor? g=None) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // The backward: (dq, dk, dv, grad_initial_state, dg). g: the log gates; dg is then the acc-type (B, H, N)
  // gradient of g, else 0 elements.
  // seg_states / seg_seglen: the forward's fourth output and
  // the seg_seglen it was given (None or 0 elements: none); used where the backward's own split is
  // (seg_states.size(2), seg_seglen), else computed again. A seg_states of another dtype, device or shape
  // raises, and so does one with a group of more than one rank.
  m.def(
      "lasp_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor? grad_final_state, Tensor? decay, "
      "float scale, Tensor state_in, str? group_name, str strategy=\"ring\", Tensor? seg_states=None, "
      "int seg_seglen=0, Tensor? g=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("set_group_checks(bool? enabled, float? timeout_s) -> ()", &lasp::set_group_checks);
  m.def("set_ring_transport(str transport) -> ()", &lasp::set_ring_transport);
  m.def("set_value_checks(bool enabled) -> ()", &lasp::set_value_checks);
  m.def("get_value_checks() -> bool", &lasp::get_value_checks);
  m.def("_thread_value_checks(int mode) -> int", &lasp::thread_value_checks);
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
