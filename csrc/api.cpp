#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>

#include "lasp.h"

namespace lasp {

std::tuple<at::Tensor, at::Tensor> lasp_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const AttentionOptions& options) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lasp::lasp_attention", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           double, const std::optional<at::Tensor>&, const std::optional<std::string>&,
                           const std::string&, const std::optional<at::Tensor>&)>();
  const double scale = options.scale.value_or(q.dim() == 4 ? 1.0 / std::sqrt(static_cast<double>(q.size(3))) : 1.0);
  return op.call(q, k, v, options.decay, scale, options.initial_state, options.group_name, options.strategy,
                 options.g);
}

}  // namespace lasp
