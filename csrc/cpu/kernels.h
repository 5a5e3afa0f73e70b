// CPU kernels of the embedloss_cpp ops (contract: embedloss_kernels/core/contract.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace embedloss {

constexpr int64_t kQueryToDoc = 1;
constexpr int64_t kQueryToQuery = 2;
constexpr int64_t kDocToQuery = 4;
constexpr int64_t kDocToDoc = 8;

constexpr int64_t kHardnessNone = 0;
constexpr int64_t kHardnessInBatch = 1;
constexpr int64_t kHardnessHard = 2;
constexpr int64_t kHardnessAll = 3;

constexpr int64_t kSimCosine = 0;
constexpr int64_t kSimDot = 1;
constexpr int64_t kSimAngle = 2;

constexpr double kEps = 1e-12;

// Both ops return (loss, d loss / d first, d loss / d second, d loss / d scale); the gradients are empty (0,) tensors
// without compute_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_cpu(
    const at::Tensor& q, const at::Tensor& a, int64_t row_start, int64_t row_count, double scale, bool cosine,
    int64_t directions, bool joint, int64_t hardness_mode, double hardness_strength, bool compute_grad,
    int64_t block_rows);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosent_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale, int64_t similarity,
    bool compute_grad);

// The row-block budget in MiB: EMBEDLOSS_BLOCK_MIB, 32 by default.
double block_budget_mib();
// Anchor rows per block of the MNRL op: its (rows x width) logits take a quarter of the budget, a multiple of 8 rows.
int64_t auto_block_rows(int64_t width, int64_t elem, int64_t row_count);

// x / max(||x||, eps) row-wise, and the clamped norms (n, 1).
std::tuple<at::Tensor, at::Tensor> normalize_rows(const at::Tensor& x);
// d/dx from d/dx_hat, in place on grad_hat: (g - x_hat <x_hat, g>) / ||x||; rows clamped at eps get g / eps.
at::Tensor normalize_rows_backward_(const at::Tensor& x_hat, const at::Tensor& norm, at::Tensor& grad_hat);

}  // namespace embedloss
