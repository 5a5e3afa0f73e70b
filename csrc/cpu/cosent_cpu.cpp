// CoSENT / AnglE on CPU in O(B log B) with its gradient, no B x B tensor.
//
// With t = scale * sim(x, y), labels sorted ascending and Z = 1 + sum_{y_i > y_j} exp(t_j - t_i):
//   loss = log Z
//   d loss / d t_k = [exp(t_k) sum_{i: y_i > y_k} exp(-t_i) - exp(-t_k) sum_{j: y_j < y_k} exp(t_j)] / Z
// Both sums are running log-sum-exps over the sorted t (suffix of -t, prefix of t), read at the ends of k's tie group.
// AnglE: sim = |cos + sin| with dims i and i + D/2 paired as (re, im), odd D zero-padded:
//   z = <x_re, y_re - y_im> + <x_im, y_im + y_re>,  dz/dx = [y_re - y_im, y_im + y_re],  dz/dy = [x_re + x_im, x_im - x_re]
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include <torch/library.h>

#include "kernels.h"

namespace embedloss {
namespace {

double log_add_exp(double u, double v) {
  if (u == -std::numeric_limits<double>::infinity()) return v;
  if (v == -std::numeric_limits<double>::infinity()) return u;
  const double m = std::max(u, v);
  return m + std::log1p(std::exp(-std::abs(u - v)));
}

// [re + sign im, im - sign re]: AnglE's dz/dx from y (sign = -1) or dz/dy from x (sign = +1).
at::Tensor angle_partner(const at::Tensor& v, double sign) {
  auto halves = v.chunk(2, 1);
  const at::Tensor& re = halves[0];
  const at::Tensor& im = halves[1];
  return at::cat({re + im * sign, im - re * sign}, 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosent_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale, int64_t similarity,
    bool compute_grad) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == y.sizes(), "embedloss_cpp::cosent: x and y must be (B, D) alike, got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && at::isFloatingType(x.scalar_type()),
              "embedloss_cpp::cosent: x and y must share a floating dtype, got ", x.scalar_type(), " and ",
              y.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "embedloss_cpp::cosent: labels must be (B,) = (",
              x.size(0), ",), got ", labels.sizes());
  TORCH_CHECK(similarity >= kSimCosine && similarity <= kSimAngle,
              "embedloss_cpp::cosent: similarity must be 0 (cosine), 1 (dot) or 2 (angle), got ", similarity);

  const auto work = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor xf = x.detach().to(work).contiguous(), yf = y.detach().to(work).contiguous();
  if (similarity == kSimAngle && D % 2) {
    xf = at::constant_pad_nd(xf, {0, 1});
    yf = at::constant_pad_nd(yf, {0, 1});
  }
  at::Tensor x_norm, y_norm;
  const bool normalized = similarity == kSimCosine || similarity == kSimAngle;
  if (normalized) {
    std::tie(xf, x_norm) = normalize_rows(xf);
    std::tie(yf, y_norm) = normalize_rows(yf);
  }
  at::Tensor dz_dx, z;
  if (similarity == kSimAngle) {
    dz_dx = angle_partner(yf, -1.0);
    z = (xf * dz_dx).sum(1);
  } else {
    z = (xf * yf).sum(1);
  }
  const at::Tensor sim = (similarity == kSimAngle ? z.abs() : z).to(at::kDouble).contiguous();
  at::Tensor t = sim * scale;
  at::Tensor lab = labels.to(at::kDouble).contiguous();

  // -- sort by label, then running log-sum-exps --
  const double* tp = t.data_ptr<double>();
  const double* lp = lab.data_ptr<double>();
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return lp[i] < lp[j]; });
  std::vector<double> ts(B), sl(B);
  for (int64_t k = 0; k < B; ++k) {
    ts[k] = tp[order[k]];
    sl[k] = lp[order[k]];
  }
  const double neg_inf = -std::numeric_limits<double>::infinity();
  std::vector<double> suffix(B + 1, neg_inf), prefix(B + 1, neg_inf);  // LSE(-t[m:]), LSE(t[:m])
  for (int64_t m = B - 1; m >= 0; --m) suffix[m] = log_add_exp(-ts[m], suffix[m + 1]);
  for (int64_t m = 0; m < B; ++m) prefix[m + 1] = log_add_exp(prefix[m], ts[m]);

  std::vector<double> as_lower(B), as_higher(B);
  double loss = 0.0;  // log of the 1 in Z
  for (int64_t k = 0; k < B; ++k) {
    const int64_t higher_start = std::upper_bound(sl.begin(), sl.end(), sl[k]) - sl.begin();
    const int64_t lower_end = std::lower_bound(sl.begin(), sl.end(), sl[k]) - sl.begin();
    as_lower[k] = ts[k] + suffix[higher_start];   // log sum_{i: y_i > y_k} exp(t_k - t_i)
    as_higher[k] = prefix[lower_end] - ts[k];     // log sum_{j: y_j < y_k} exp(t_j - t_k)
    loss = log_add_exp(loss, as_lower[k]);
  }
  at::Tensor loss_t = at::scalar_tensor(loss, x.options().dtype(work));
  if (!compute_grad) {
    // Distinct tensors: outputs of an op must not alias each other.
    return {loss_t, at::empty({0}, x.options()), at::empty({0}, x.options()), at::empty({0}, loss_t.options())};
  }

  // d loss / d t_k, and d loss / d scale = sum_k d loss / d t_k sim_k directly (any scale, 0 included)
  at::Tensor dsim = at::empty({B}, x.options().dtype(at::kDouble));
  double* dp = dsim.data_ptr<double>();
  const double* simp = sim.data_ptr<double>();
  double grad_scale = 0.0;
  for (int64_t k = 0; k < B; ++k) {
    const double dt = std::exp(as_lower[k] - loss) - std::exp(as_higher[k] - loss);
    grad_scale += dt * simp[order[k]];
    dp[order[k]] = dt * scale;
  }
  at::Tensor dx, dy;
  if (similarity == kSimAngle) {
    at::Tensor dz = (dsim.to(work) * z.sign()).unsqueeze(1);
    dx = dz * dz_dx;
    dy = dz * angle_partner(xf, 1.0);
  } else {
    at::Tensor ds = dsim.to(work).unsqueeze(1);
    dx = ds * yf;
    dy = ds * xf;
  }
  if (normalized) {
    dx = normalize_rows_backward_(xf, x_norm, dx).narrow(1, 0, D);
    dy = normalize_rows_backward_(yf, y_norm, dy).narrow(1, 0, D);
  }
  return {loss_t, dx.to(x.scalar_type()).contiguous(), dy.to(y.scalar_type()).contiguous(),
          at::scalar_tensor(grad_scale, loss_t.options())};
}

}  // namespace embedloss

// The CPU kernel of embedloss_cpp::cosent. The schema (embedloss_kernels/core/contract.py), the fake implementation and
// the autograd are registered from Python (embedloss_kernels/ops).
TORCH_LIBRARY_IMPL(embedloss_cpp, CPU, m) { m.impl("cosent", &embedloss::cosent_cpu); }
