// CPU implementations of the lasp building blocks (semantics in kernels/lasp_params.h).
// They see only AttnParams, so GoogleTest drives them directly.
#pragma once
#include "lasp_params.h"

namespace lasp {
namespace cpu {

void fwd(const AttnParams& p);
void fwd_local(const AttnParams& p);
void bwd(const AttnParams& p);
void bwd_local(const AttnParams& p);
void bwd_prepare(const AttnParams& p);

}  // namespace cpu
}  // namespace lasp
