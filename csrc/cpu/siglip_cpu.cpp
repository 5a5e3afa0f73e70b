// SigLIP (sigmoid pairwise loss) on CPU with its gradients, one pass over row blocks, no B x N tensor kept.
//
// Per block of rows: S = X_b Y^T (at::mm), then one elementwise pass in place over S with z = s S + b and the
// positive's sign folded in (z' = -z at the block's diagonal column positive_offset + r0 + k):
//   loss term  softplus(z') = max(z', 0) + log1p(e),   e = exp(-|z'|)
//   G          sigmoid(z')  = (z' >= 0 ? 1 : e) / (1 + e), negated again on the positive (sigmoid(z) - 1 = -sigmoid(-z))
// then G Y (this block's dX; sum_i <x_i, (G Y)_i> gives d loss / d s) and dY += G^T X_b. Finally dX, dY times s / B,
// d loss / d b = sum G / B. float: exp_approx and a Cephes-style log polynomial (vectorized, ~1 ulp); double: std::.
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"
#include "simd.h"

namespace embedloss {
namespace {

// log1p(e) for e in [0, 1], float, branch-free, given u = 1 + e and r = 1 / u: log(u) by a Cephes polynomial around
// 1, plus the rounding of u ((e - (u - 1)) / u), so tiny e keep their full precision.
EMBEDLOSS_INLINE float log1p_unit(float e, float u, float r) {
  const float c = (e - (u - 1.0f)) * r;
  const bool high = u > 1.41421356f;
  const float m = high ? 0.5f * u : u;
  const float k = high ? 1.0f : 0.0f;
  const float x = m - 1.0f;
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float y = x * z * p;
  y += k * -2.12194440e-4f;
  y -= 0.5f * z;
  return x + y + k * 0.693359375f + c;
}

template <typename T>
struct Pass;

template <>
struct Pass<float> {
  static EMBEDLOSS_INLINE float ex(float v) { return exp_approx(v); }
  static EMBEDLOSS_INLINE float lp(float e, float u, float r) { return log1p_unit(e, u, r); }
};

template <>
struct Pass<double> {
  static EMBEDLOSS_INLINE double ex(double v) { return std::exp(v); }
  static EMBEDLOSS_INLINE double lp(double e, double, double) { return std::log1p(e); }
};

// Columns j0 .. j1 - 1 of a row as negatives, in place: S -> G = sigmoid(z) (when GRAD); adds the loss terms and G.
// One reciprocal per element serves both sigmoid and the log1p's rounding term.
template <typename T, bool GRAD>
EMBEDLOSS_INLINE void negatives(T* __restrict__ row, int64_t j0, int64_t j1, T s, T b, T& loss, T& gs) {
  T l = 0, g = 0;
#pragma omp simd reduction(+ : l, g)
  for (int64_t j = j0; j < j1; ++j) {
    const T z = s * row[j] + b;
    const T e = Pass<T>::ex(-std::abs(z));
    const T u = T(1) + e;
    const T r = T(1) / u;
    l += (z > T(0) ? z : T(0)) + Pass<T>::lp(e, u, r);
    if constexpr (GRAD) {
      const T sig = z >= T(0) ? r : e * r;
      row[j] = sig;
      g += sig;
    }
  }
  loss += l;
  gs += g;
}

template <typename T>
EMBEDLOSS_INLINE void negatives(T* __restrict__ row, int64_t j0, int64_t j1, T s, T b, bool grad, T& loss, T& gs) {
  if (grad) {
    negatives<T, true>(row, j0, j1, s, b, loss, gs);
  } else {
    negatives<T, false>(row, j0, j1, s, b, loss, gs);
  }
}

// One row of the block in place (S -> G when grad); returns the loss terms' sum, *gsum gets sum G. pos: the
// positive's column, or -1. The positive's term is softplus(-z) and its G is sigmoid(z) - 1 = -sigmoid(-z).
template <typename T>
EMBEDLOSS_INLINE T row_pass(T* __restrict__ row, int64_t n, T s, T b, int64_t pos, bool grad, T* gsum) {
  T loss = 0, gs = 0;
  if (pos < 0) {
    negatives(row, 0, n, s, b, grad, loss, gs);
  } else {
    negatives(row, 0, pos, s, b, grad, loss, gs);
    negatives(row, pos + 1, n, s, b, grad, loss, gs);
    const T z = -(s * row[pos] + b);
    const T e = Pass<T>::ex(-std::abs(z));
    const T u = T(1) + e;
    const T r = T(1) / u;
    loss += (z > T(0) ? z : T(0)) + Pass<T>::lp(e, u, r);
    if (grad) {
      const T sig = -(z >= T(0) ? r : e * r);
      row[pos] = sig;
      gs += sig;
    }
  }
  *gsum = gs;
  return loss;
}

EMBEDLOSS_CLONES float row_pass_isa(float* row, int64_t n, float s, float b, int64_t pos, bool grad, float* gsum) {
  return row_pass<float>(row, n, s, b, pos, grad, gsum);
}

EMBEDLOSS_CLONES double row_pass_isa(double* row, int64_t n, double s, double b, int64_t pos, bool grad,
                                     double* gsum) {
  return row_pass<double>(row, n, s, b, pos, grad, gsum);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias, int64_t positive_offset,
    bool has_positives, bool compute_grad, int64_t block_rows) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1),
              "embedloss_cpp::siglip: x and y must be (B, D) and (N, D), got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && at::isFloatingType(x.scalar_type()),
              "embedloss_cpp::siglip: x and y must share a floating dtype, got ", x.scalar_type(), " and ",
              y.scalar_type());
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1,
              "embedloss_cpp::siglip: scale and bias must be one-element tensors, got ", scale.sizes(), " and ",
              bias.sizes());
  const int64_t B = x.size(0), N = y.size(0);
  TORCH_CHECK(!has_positives || (positive_offset >= 0 && positive_offset + B <= N),
              "embedloss_cpp::siglip: positive_offset must be in 0..N - B = ", N - B, " with positives, got ",
              positive_offset);
  const auto work = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xf = x.detach().to(work).contiguous(), yf = y.detach().to(work).contiguous();
  const at::Tensor yt = yf.t();
  const double s = scale.item<double>(), b = bias.item<double>();
  const int64_t rows = block_rows > 0 ? std::min(block_rows, std::max<int64_t>(B, 1))
                                      : auto_block_rows(N, at::elementSize(work), std::max<int64_t>(B, 1));
  at::Tensor dx = compute_grad ? at::empty_like(xf) : at::Tensor();
  at::Tensor dy = compute_grad ? at::zeros_like(yf) : at::Tensor();
  double loss_sum = 0.0, gsum = 0.0, radial = 0.0;
  std::vector<double> row_loss, row_g;
  // One logits buffer for every block (a fresh one per block lets the allocator's freed blocks pile up: peak RSS
  // grew by ~30 MB more than the block at B = N = 8192).
  at::Tensor z_buffer = at::empty({std::min(rows, B), N}, xf.options());
  for (int64_t r0 = 0; r0 < B; r0 += rows) {
    const int64_t n = std::min(rows, B - r0);
    const at::Tensor xb = xf.narrow(0, r0, n);
    at::Tensor z = z_buffer.narrow(0, 0, n);
    at::mm_out(z, xb, yt);
    row_loss.assign(n, 0.0);
    row_g.assign(n, 0.0);
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "embedloss_siglip_cpu", [&] {
      scalar_t* zp = z.data_ptr<scalar_t>();
      const scalar_t sv = static_cast<scalar_t>(s), bv = static_cast<scalar_t>(b);
      at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          scalar_t g = 0;
          const int64_t pos = has_positives ? positive_offset + r0 + k : -1;
          row_loss[k] = row_pass_isa(zp + k * N, N, sv, bv, pos, compute_grad, &g);
          row_g[k] = g;
        }
      });
    });
    for (int64_t k = 0; k < n; ++k) {
      loss_sum += row_loss[k];
      gsum += row_g[k];
    }
    if (!compute_grad) continue;
    at::Tensor dxb = dx.narrow(0, r0, n);
    at::mm_out(dxb, z, yf);
    radial += at::dot(xb.reshape({-1}), dxb.reshape({-1})).item<double>();
    dy.addmm_(z.t(), xb);
  }
  const double inv_b = 1.0 / static_cast<double>(std::max<int64_t>(B, 1));
  at::Tensor loss = at::scalar_tensor(loss_sum * inv_b, x.options().dtype(work));
  if (!compute_grad) {
    // Distinct tensors: outputs of an op must not alias each other.
    return {loss, at::empty({0}, x.options()), at::empty({0}, x.options()), at::empty({0}, loss.options()),
            at::empty({0}, loss.options())};
  }
  dx.mul_(s * inv_b);
  dy.mul_(s * inv_b);
  return {loss, dx.to(x.scalar_type()).contiguous(), dy.to(y.scalar_type()).contiguous(),
          at::scalar_tensor(radial * inv_b, loss.options()), at::scalar_tensor(gsum * inv_b, loss.options())};
}

}  // namespace embedloss

// The CPU kernel of embedloss_cpp::siglip. The schema (embedloss_kernels/core/contract.py), the fake implementation
// and the autograd are registered from Python (embedloss_kernels/ops).
TORCH_LIBRARY_IMPL(embedloss_cpp, CPU, m) { m.impl("siglip", &embedloss::siglip_cpu); }
