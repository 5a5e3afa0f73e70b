// Fused GIST (GISTEmbedLoss) on CPU: loss and d loss / d (anchor, candidates) in one pass over row blocks, the
// guide's false-negative masks applied inside the row pass (contract: embedloss_kernels/ops/__init__.py).
//
// Per block of local anchor rows i, own = row_start + i, with ^ the cosine normalization (x / max(||x||, 1e-8), as
// nn.CosineSimilarity) and ' the guide's embeddings:
//   t_i = a'^_i . p'^_own;  bound_i = t_i - margin (absolute) or t_i - |t_i| margin (relative)
//   L_c  = s a^_i C^T    masked where a'^_i C'^T > bound_i, never at column own     (R, columns*Bw)
//   L_aa = s a^_i A^T    masked where a'^_i A'^T > bound_i                            (R, B)
//   L_pp = s p^_own P^T  masked where p'^_own P'^T > bound_i                          (R, Bw)
//   loss_i = LSE(L_c, L_aa, L_pp) - L_c[own];  G = (softmax - onehot(own)) s / B
//   d a^_i += G_c C^ + G_aa A^;  d C^ += G_c^T a^_i;  d A^ += G_aa^T a^_i;  d p^_own += G_pp P^;  d P^ += G_pp^T p^_own
//
// As the InfoNCE kernel: products on the raw rows (ATen's BLAS) and the inverse norms applied in the row pass, the
// gradient matrix becomes diag(1/n_row) G diag(1/n_col) in place, so the accumulators hold d/dv^ / max(||v||, eps);
// the normalization's backward (with the clamp held constant, as nn.CosineSimilarity) maps them to d/dv at the end.
// The guide's three products per block land in a second buffer of the guide's dtype, read once by the row pass
// (forward only). Extra memory: one block of logits and one of guide similarities, plus the two gradients.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include <torch/library.h>

#include "gist.h"
#include "kernels.h"
#include "simd.h"

namespace embedloss {
namespace {

struct GistArgs {
  int64_t b, bw, pool, row_start, rows_per_block, strategy;
  double scale, margin;
  bool contrast_anchors, contrast_positives, compute_grad;
};

// One row of a block: logits scaled by s / (||row|| ||col||) and masked where the guide's similarity (computed the
// same way from the guide's product) exceeds the bound; returns the row max. Branch-free over the columns.
template <typename T, typename G>
EMBEDLOSS_INLINE T scale_and_mask(T* __restrict__ x, const G* __restrict__ g, int64_t n, T row_factor,
                             const T* __restrict__ inv_col, G guide_row, const G* __restrict__ ginv_col, G bound) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T m = neg_inf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const G gs = g[j] * guide_row * ginv_col[j];
    const T v = gs > bound ? neg_inf : x[j] * row_factor * inv_col[j];
    x[j] = v;
    m = simd_max(m, v);
  }
  return m;
}

template <typename T>
EMBEDLOSS_INLINE void scale_cols(T* __restrict__ x, int64_t n, T f, const T* __restrict__ col) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= f * col[j];
}

struct GistNorms {
  const void *inv_a, *inv_c, *ginv_a, *ginv_c;  // clamped inverse norms: model (T) and guide (G)
};

// Rows [begin, end) of the block starting at local row r0.
template <typename T, typename G>
EMBEDLOSS_INLINE void gist_rows(const GistArgs& p, const GistNorms& nrm, int64_t r0, int64_t begin, int64_t end, T* lc,
                           T* laa, T* lpp, const G* gc, const G* gaa, const G* gpp, double* row_loss) {
  const T* inv_a = static_cast<const T*>(nrm.inv_a);
  const T* inv_c = static_cast<const T*>(nrm.inv_c);
  const G* ginv_a = static_cast<const G*>(nrm.ginv_a);
  const G* ginv_c = static_cast<const G*>(nrm.ginv_c);
  const int64_t C = p.pool, B = p.b, Bw = p.bw;
  const T s = static_cast<T>(p.scale);
  const T s_over_b = static_cast<T>(p.scale / static_cast<double>(B));
  const G margin = static_cast<G>(p.margin);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row = r0 + i, own = p.row_start + row;
    T* x_c = lc + i * C;
    T* x_aa = p.contrast_anchors ? laa + i * B : nullptr;
    T* x_pp = p.contrast_positives ? lpp + i * Bw : nullptr;
    // the threshold, from the guide's product exactly as every other guide similarity of the row
    const G t = gc[i * C + own] * ginv_a[row] * ginv_c[own];
    const G bound = p.strategy == kGistAbsolute ? t - margin : t - std::abs(t) * margin;
    const T r_a = inv_a[row] * s;
    const T positive = x_c[own] * r_a * inv_c[own];
    T m = scale_and_mask(x_c, gc + i * C, C, r_a, inv_c, ginv_a[row], ginv_c, bound);
    x_c[own] = positive;  // the true positive is never masked
    m = std::max(m, positive);
    if (x_aa) m = std::max(m, scale_and_mask(x_aa, gaa + i * B, B, r_a, inv_a, ginv_a[row], ginv_a, bound));
    const T r_p = inv_c[own] * s;
    if (x_pp) m = std::max(m, scale_and_mask(x_pp, gpp + i * Bw, Bw, r_p, inv_c, ginv_c[own], ginv_c, bound));
    T total = exp_shift_sum(x_c, C, m);
    if (x_aa) total += exp_shift_sum(x_aa, B, m);
    if (x_pp) total += exp_shift_sum(x_pp, Bw, m);
    row_loss[i] = static_cast<double>(m) + std::log(static_cast<double>(total)) - static_cast<double>(positive);
    if (!p.compute_grad) continue;

    // H = diag(1/n_row) (softmax - onehot) s / B diag(1/n_col)
    const T w = s_over_b / total;
    const T ra = inv_a[row];
    const T e_own = x_c[own];
    scale_cols(x_c, C, w * ra, inv_c);
    x_c[own] = (e_own * w - s_over_b) * ra * inv_c[own];  // softmax - 1: exactly 0 when only the positive is left
    if (x_aa) scale_cols(x_aa, B, w * ra, inv_a);
    if (x_pp) scale_cols(x_pp, Bw, w * inv_c[own], inv_c);
  }
}

EMBEDLOSS_CLONES void gist_rows_isa(const GistArgs& p, const GistNorms& n, int64_t r0, int64_t begin, int64_t end,
                               float* lc, float* laa, float* lpp, const float* gc, const float* gaa, const float* gpp,
                               double* row_loss) {
  gist_rows<float, float>(p, n, r0, begin, end, lc, laa, lpp, gc, gaa, gpp, row_loss);
}
EMBEDLOSS_CLONES void gist_rows_isa(const GistArgs& p, const GistNorms& n, int64_t r0, int64_t begin, int64_t end,
                               float* lc, float* laa, float* lpp, const double* gc, const double* gaa,
                               const double* gpp, double* row_loss) {
  gist_rows<float, double>(p, n, r0, begin, end, lc, laa, lpp, gc, gaa, gpp, row_loss);
}
EMBEDLOSS_CLONES void gist_rows_isa(const GistArgs& p, const GistNorms& n, int64_t r0, int64_t begin, int64_t end,
                               double* lc, double* laa, double* lpp, const float* gc, const float* gaa,
                               const float* gpp, double* row_loss) {
  gist_rows<double, float>(p, n, r0, begin, end, lc, laa, lpp, gc, gaa, gpp, row_loss);
}
EMBEDLOSS_CLONES void gist_rows_isa(const GistArgs& p, const GistNorms& n, int64_t r0, int64_t begin, int64_t end,
                               double* lc, double* laa, double* lpp, const double* gc, const double* gaa,
                               const double* gpp, double* row_loss) {
  gist_rows<double, double>(p, n, r0, begin, end, lc, laa, lpp, gc, gaa, gpp, row_loss);
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Every block: the model's and the guide's products, the parallel row pass, the gradient products. Returns the sum
// of the row losses (in row order: the same for any thread count).
template <typename T, typename G>
double gist_blocks(const GistArgs& p, const at::Tensor& a, const at::Tensor& c, const at::Tensor& ag,
                   const at::Tensor& cg, const at::Tensor& inv_a, const at::Tensor& inv_c, const at::Tensor& ginv_a,
                   const at::Tensor& ginv_c, at::Tensor& ha, at::Tensor& hc) {
  const int64_t R = p.rows_per_block, C = p.pool, B = p.b, Bw = p.bw;
  const at::Tensor pm = c.narrow(0, 0, Bw), pg = cg.narrow(0, 0, Bw);
  at::Tensor l_c = at::empty({R, C}, a.options());
  at::Tensor l_aa = p.contrast_anchors ? at::empty({R, B}, a.options()) : at::Tensor();
  at::Tensor l_pp = p.contrast_positives ? at::empty({R, Bw}, a.options()) : at::Tensor();
  at::Tensor g_c = at::empty({R, C}, ag.options());
  at::Tensor g_aa = p.contrast_anchors ? at::empty({R, B}, ag.options()) : at::Tensor();
  at::Tensor g_pp = p.contrast_positives ? at::empty({R, Bw}, ag.options()) : at::Tensor();
  const GistNorms norms{inv_a.data_ptr<T>(), inv_c.data_ptr<T>(), ginv_a.data_ptr<G>(), ginv_c.data_ptr<G>()};
  std::vector<double> row_loss(R);
  double loss_sum = 0.0;

  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t n = std::min(R, B - r0), p0 = p.row_start + r0;
    const at::Tensor a_blk = a.narrow(0, r0, n), p_blk = pm.narrow(0, p0, n);
    at::Tensor x_c = l_c.narrow(0, 0, n), y_c = g_c.narrow(0, 0, n);
    at::Tensor x_aa = p.contrast_anchors ? l_aa.narrow(0, 0, n) : at::Tensor();
    at::Tensor x_pp = p.contrast_positives ? l_pp.narrow(0, 0, n) : at::Tensor();
    at::Tensor y_aa = p.contrast_anchors ? g_aa.narrow(0, 0, n) : at::Tensor();
    at::Tensor y_pp = p.contrast_positives ? g_pp.narrow(0, 0, n) : at::Tensor();

    // -- the model's products and the guide's (one extra product per block, forward only) --
    at::mm_out(x_c, a_blk, c.t());
    at::mm_out(y_c, ag.narrow(0, r0, n), cg.t());
    if (p.contrast_anchors) {
      at::mm_out(x_aa, a_blk, a.t());
      at::mm_out(y_aa, ag.narrow(0, r0, n), ag.t());
    }
    if (p.contrast_positives) {
      at::mm_out(x_pp, p_blk, pm.t());
      at::mm_out(y_pp, pg.narrow(0, p0, n), pg.t());
    }

    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      gist_rows_isa(p, norms, r0, begin, end, x_c.data_ptr<T>(), ptr_or_null<T>(x_aa), ptr_or_null<T>(x_pp),
                    y_c.data_ptr<G>(), ptr_or_null<G>(y_aa), ptr_or_null<G>(y_pp), row_loss.data());
    });
    for (int64_t i = 0; i < n; ++i) loss_sum += row_loss[i];
    if (!p.compute_grad) continue;

    // -- the gradient products --
    at::Tensor ha_rows = ha.narrow(0, r0, n);
    ha_rows.addmm_(x_c, c);
    hc.addmm_(x_c.t(), a_blk);
    if (p.contrast_anchors) {
      ha_rows.addmm_(x_aa, a);
      ha.addmm_(x_aa.t(), a_blk);
    }
    if (p.contrast_positives) {
      hc.narrow(0, p0, n).addmm_(x_pp, pm);
      hc.narrow(0, 0, Bw).addmm_(x_pp.t(), p_blk);
    }
  }
  return loss_sum;
}

// In place: h (d/dv^ / max(||v||, eps)) becomes d/dv = h - v <v, h> / (max(||v||, eps) ||v||), the radial term 0
// for a zero row (nn.CosineSimilarity's gradient: its clamp is a constant).
template <typename T>
void cosine_backward_(const at::Tensor& v, const at::Tensor& inv_clamped, const at::Tensor& inv_true, at::Tensor& h) {
  const int64_t rows = v.size(0), dim = v.size(1);
  const T* vp = v.data_ptr<T>();
  const T* ic = inv_clamped.data_ptr<T>();
  const T* it = inv_true.data_ptr<T>();
  T* hp = h.data_ptr<T>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* x = vp + i * dim;
      T* g = hp + i * dim;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < dim; ++j) dot += x[j] * g[j];
      const T radial = dot * ic[i] * it[i];
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) g[j] -= x[j] * radial;
    }
  });
}

int64_t gist_block_rows(int64_t width, int64_t elem, int64_t rows) {
  double mib = 32.0;  // validated in Python (torch_ops.block_budget_bytes) before the op
  if (const char* env = std::getenv("EMBEDLOSS_BLOCK_MIB")) {
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    if (end != env) {
      TORCH_CHECK(v > 0 && std::isfinite(v), "EMBEDLOSS_BLOCK_MIB must be a positive number of MiB, got '", env, "'");
      mib = v;
    }
  }
  // the InfoNCE kernel's rule: the block's logits take a quarter of the budget (rows, not memory, set the BLAS
  // efficiency: a block of the same rows as the InfoNCE op's runs its products as fast); the guide's similarities
  // take as much again in the guide's dtype
  int64_t r = static_cast<int64_t>(mib * (1 << 20) / 4) / std::max<int64_t>(width * elem, 1);
  r = r >= 16 ? r / 8 * 8 : std::max<int64_t>(r, 1);
  return std::max<int64_t>(1, std::min(r, rows));
}

std::tuple<at::Tensor, at::Tensor> inverse_norms(const at::Tensor& x) {
  const at::Tensor norm = at::linalg_vector_norm(x, 2, {1});
  at::Tensor inv_clamped = norm.clamp_min(kGistEps).reciprocal_();
  at::Tensor inv_true = at::where(norm > 0, norm.reciprocal(), at::zeros_like(norm));
  return {inv_clamped, inv_true};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gist_cpu(
    const at::Tensor& anchor, const at::Tensor& candidates, const at::Tensor& anchor_guide,
    const at::Tensor& candidates_guide, int64_t columns, int64_t row_start, double scale, int64_t margin_strategy,
    double margin, bool contrast_anchors, bool contrast_positives, bool compute_grad, int64_t block_rows) {
  const char* op = "embedloss_cpp::gist: ";
  TORCH_CHECK(anchor.dim() == 2 && candidates.dim() == 2 && anchor_guide.dim() == 2 && candidates_guide.dim() == 2,
              op, "every input must be 2-D");
  for (const at::Tensor* t : {&anchor, &candidates, &anchor_guide, &candidates_guide}) {
    TORCH_CHECK(t->device().is_cpu(), op, "inputs must be CPU tensors");
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, "inputs must be floating point, got ", t->scalar_type());
  }
  TORCH_CHECK(anchor.scalar_type() == candidates.scalar_type(), op, "anchor and candidates must share a dtype");
  TORCH_CHECK(anchor_guide.scalar_type() == candidates_guide.scalar_type(), op,
              "anchor_guide and candidates_guide must share a dtype");
  const int64_t b = anchor.size(0);
  TORCH_CHECK(columns >= 1 && b > 0 && candidates.size(0) % columns == 0, op, "candidates must be (columns*Bw, D)");
  const int64_t bw = candidates.size(0) / columns;
  TORCH_CHECK(candidates.size(1) == anchor.size(1), op, "anchor and candidates must share a dim");
  TORCH_CHECK(anchor_guide.size(0) == b && candidates_guide.size(0) == candidates.size(0) &&
                  anchor_guide.size(1) == candidates_guide.size(1),
              op, "the guide's embeddings must have the rows of the model's");
  TORCH_CHECK(row_start >= 0 && row_start + b <= bw, op, "rows [row_start, row_start + B) must lie in [0, ", bw,
              "), got row_start ", row_start, " and B ", b);
  TORCH_CHECK(margin_strategy == kGistAbsolute || margin_strategy == kGistRelative, op,
              "margin_strategy must be 0 (absolute) or 1 (relative), got ", margin_strategy);

  const auto work = anchor.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto gwork = anchor_guide.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor a = anchor.detach().to(work).contiguous(), c = candidates.detach().to(work).contiguous();
  const at::Tensor ag = anchor_guide.detach().to(gwork).contiguous();
  const at::Tensor cg = candidates_guide.detach().to(gwork).contiguous();
  auto [inv_a, tinv_a] = inverse_norms(a);
  auto [inv_c, tinv_c] = inverse_norms(c);
  const at::Tensor ginv_a = std::get<0>(inverse_norms(ag)), ginv_c = std::get<0>(inverse_norms(cg));

  GistArgs p;
  p.b = b;
  p.bw = bw;
  p.pool = candidates.size(0);
  p.row_start = row_start;
  p.strategy = margin_strategy;
  p.scale = scale;
  p.margin = margin;
  p.contrast_anchors = contrast_anchors;
  p.contrast_positives = contrast_positives;
  p.compute_grad = compute_grad;
  const int64_t width = p.pool + (contrast_anchors ? b : 0) + (contrast_positives ? bw : 0);
  p.rows_per_block = block_rows > 0 ? std::min(block_rows, b)
                                    : gist_block_rows(width, at::elementSize(work), b);

  at::Tensor ha = compute_grad ? at::zeros_like(a) : at::Tensor();
  at::Tensor hc = compute_grad ? at::zeros_like(c) : at::Tensor();
  double loss_sum = 0.0;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "embedloss_gist_cpu", [&] {
    using T = scalar_t;
    if (gwork == at::kDouble) {
      loss_sum = gist_blocks<T, double>(p, a, c, ag, cg, inv_a, inv_c, ginv_a, ginv_c, ha, hc);
    } else {
      loss_sum = gist_blocks<T, float>(p, a, c, ag, cg, inv_a, inv_c, ginv_a, ginv_c, ha, hc);
    }
  });
  at::Tensor loss = at::scalar_tensor(loss_sum / static_cast<double>(b), anchor.options().dtype(work));
  if (!compute_grad) return {loss, at::empty({0}, anchor.options()), at::empty({0}, candidates.options())};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "embedloss_gist_cosine_backward", [&] {
    cosine_backward_<scalar_t>(a, inv_a, tinv_a, ha);
    cosine_backward_<scalar_t>(c, inv_c, tinv_c, hc);
  });
  return {loss, ha.to(anchor.scalar_type()), hc.to(candidates.scalar_type())};
}

}  // namespace embedloss

// The CPU kernel of embedloss_cpp::gist. The schema (embedloss_kernels/core/contract.py), the fake implementation and
// the autograd are registered from Python (embedloss_kernels/ops).
TORCH_LIBRARY_IMPL(embedloss_cpp, CPU, m) { m.impl("gist", &embedloss::gist_cpu); }
