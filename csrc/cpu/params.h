// The parameters that the CPU ops pass to the kernels, prepared in fp32 on the host (csrc/ops/common.h).
#pragma once

#include <cstdint>

namespace fakequant::cpu {

// Per-channel parameters of a dense tensor walked linearly over storage.
//   period == 0 ("runs"): storage offset o belongs to channel (o / run) % channels; the arrays hold
//     `channels` entries and every run of `run` consecutive elements shares one entry.
//   period > 0 ("pattern"): the arrays hold `period` entries (the channel pattern of storage, repeated),
//     and offset o uses entry o % period. Used when runs are shorter than a vector block.
struct ChannelParams {
  const float* scale = nullptr;
  const float* inv_scale = nullptr;
  const float* zero_point = nullptr;
  const float* fold = nullptr;  // BN fold factor per entry, or nullptr (plain per-channel fake quant)
  bool divide_by_fold = false;  // with fold: q(x * fold) / fold (fold already bn_fold_training_factor's)
  int64_t run = 1;
  int64_t channels = 1;
  int64_t period = 0;
  float quant_min = 0.0f;
  float quant_max = 0.0f;
};

}  // namespace fakequant::cpu
