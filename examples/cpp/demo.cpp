// A LibTorch program calling lasp's op through its public header, with autograd.
// Built by CMake (target lasp_cpp_demo) and run by ctest.
#include <torch/torch.h>

#include <algorithm>
#include <iostream>

#include "lasp.h"

int main() {
  torch::manual_seed(0);
  const int64_t B = 2, H = 4, Hkv = 2, N = 100, D = 16, E = 24;
  auto q = torch::randn({B, H, N, D}, torch::requires_grad());
  auto k = torch::randn({B, Hkv, N, D}, torch::requires_grad());
  auto v = torch::randn({B, Hkv, N, E}, torch::requires_grad());

  lasp::AttentionOptions opts;
  opts.decay = lasp::alibi_slopes(H);
  auto [o, final_state] = lasp::lasp_attention(q, k, v, opts);
  (o.square().sum() + final_state.sum()).backward();

  // Chunked prefill: two calls carrying the state give the same output as one.
  using torch::indexing::Slice;
  lasp::AttentionOptions first = opts;
  auto [o1, s1] = lasp::lasp_attention(q.slice(2, 0, 37), k.slice(2, 0, 37), v.slice(2, 0, 37), first);
  lasp::AttentionOptions second = opts;
  second.initial_state = s1;
  auto [o2, s2] = lasp::lasp_attention(q.slice(2, 37), k.slice(2, 37), v.slice(2, 37), second);
  const double err_o = (torch::cat({o1, o2}, 2) - o).abs().max().item<double>();
  const double err_s = (s2 - final_state).abs().max().item<double>();

  // Per-token log gates (differentiable): constant gates -decay[h] give the decayed attention above.
  lasp::AttentionOptions gated;
  auto g = (-lasp::alibi_slopes(H)).view({1, H, 1}).expand({B, H, N}).clone().requires_grad_();
  gated.g = g;
  auto [og, sg] = lasp::lasp_attention(q, k, v, gated);
  og.square().sum().backward();
  const double err_g = (og - o).abs().max().item<double>();

  // The gated delta rule (Gated DeltaNet), GVA heads: the same two-call prefill property, with autograd.
  auto dq_ = torch::randn({B, 1, N, D}).requires_grad_();
  auto dk_ = torch::nn::functional::normalize(torch::randn({B, 1, N, D}),
                                              torch::nn::functional::NormalizeFuncOptions().dim(-1))
                 .requires_grad_();
  auto dv_ = torch::randn({B, H, N, E}).requires_grad_();
  auto dg_ = (-torch::rand({B, H, N})).requires_grad_();
  auto db_ = torch::sigmoid(torch::randn({B, H, N})).requires_grad_();
  auto [od, sd] = lasp::gated_delta_attention(dq_, dk_, dv_, dg_, db_);
  (od.square().sum() + sd.sum()).backward();
  lasp::DeltaOptions dfirst;
  auto [od1, sd1] = lasp::gated_delta_attention(dq_.slice(2, 0, 70), dk_.slice(2, 0, 70), dv_.slice(2, 0, 70),
                                                dg_.slice(2, 0, 70), db_.slice(2, 0, 70), dfirst);
  lasp::DeltaOptions dsecond;
  dsecond.initial_state = sd1;
  auto [od2, sd2] = lasp::gated_delta_attention(dq_.slice(2, 70), dk_.slice(2, 70), dv_.slice(2, 70),
                                                dg_.slice(2, 70), db_.slice(2, 70), dsecond);
  const double err_d = std::max((torch::cat({od1, od2}, 2) - od).abs().max().item<double>(),
                                (sd2 - sd).abs().max().item<double>());

  std::cout << "o " << o.sizes() << ", final_state " << final_state.sizes() << ", |dq| "
            << q.grad().norm().item<double>() << ", split-vs-whole max error o " << err_o << ", state " << err_s
            << ", gates-vs-decay max error o " << err_g << ", gated delta rule split-vs-whole max error " << err_d
            << "\n";
  if (!q.grad().defined() || !k.grad().defined() || !v.grad().defined() || !g.grad().defined() || err_o > 1e-4 ||
      err_s > 1e-3 || err_g > 1e-4 || !dg_.grad().defined() || !db_.grad().defined() || !dq_.grad().defined() ||
      err_d > 1e-4) {
    std::cout << "lasp C++ demo: FAILED\n";
    return 1;
  }
  std::cout << "lasp C++ demo: OK\n";
  return 0;
}
