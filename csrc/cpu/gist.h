// CPU kernel of embedloss_cpp::gist (contract: embedloss_kernels/core/contract.py, GIST_SCHEMA).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace embedloss {

constexpr int64_t kGistAbsolute = 0;
constexpr int64_t kGistRelative = 1;
constexpr double kGistEps = 1e-8;  // nn.CosineSimilarity's eps

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_cpu(
    const at::Tensor& anchor, const at::Tensor& candidates, const at::Tensor& anchor_guide,
    const at::Tensor& candidates_guide, int64_t columns, int64_t row_start, double scale, int64_t margin_strategy,
    double margin, bool contrast_anchors, bool contrast_positives, bool compute_grad, int64_t block_rows);

}  // namespace embedloss
