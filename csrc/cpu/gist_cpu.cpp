// Fused GIST (GISTEmbedLoss) on CPU: loss and d loss / d (anchor, candidates) in one pass over row blocks, the
// guide's false-negative masks applied inside the row pass (contract: embedloss_kernels/ops/__init__.py).
//
// Per block of local anchor rows i, own = row_start + i, with ^ the cosine normalization (x / max(||x||, 1e-8), as
// nn.CosineSimilarity) and ' the guide's embeddings:
//   t_i = a'^_i . p'^_own (exact_dot);  bound_i = t_i - margin (absolute) or t_i - |t_i| margin (relative)
//   L_c  = s a^_i C^T    masked where a'^_i C'^T > bound_i, never at column own     (R, columns*Bw)
//   L_aa = s a^_i A^T    masked where a'^_i A'^T > bound_i                            (R, B)
//   L_pp = s p^_own P^T  masked where p'^_own P'^T > bound_i                          (R, Bw)
//   loss_i = LSE(L_c, L_aa, L_pp) - L_c[own];  G = (softmax - onehot(own)) s / B
//   d a^_i += G_c C^ + G_aa A^;  d C^ += G_c^T a^_i;  d A^ += G_aa^T a^_i;  d p^_own += G_pp P^;  d P^ += G_pp^T p^_own
//
// As the InfoNCE kernel: products on the raw rows (ATen's BLAS) and the inverse norms applied in the row pass, the
// gradient matrix becomes diag(1/n_row) G diag(1/n_col) in place, so the accumulators hold d/dv^ / max(||v||, eps);
// the normalization's backward (with the clamp held constant, as nn.CosineSimilarity) maps them to d/dv at the end.
// The guide's three products per block (of its normalized rows) land in a second buffer of the guide's dtype, read
// once by the row pass (forward only). Ties: sentence-transformers takes t_i from the same guide matrix as every
// candidate and masks strictly, so a repeated text (a candidate equal to t_i) is kept; a BLAS product can round the
// same pair of rows differently at another position or in another product, so the row pass recomputes t_i and every
// candidate within tie_band of the bound with exact_dot (one fixed loop: the same bits for the same pair of rows).
// Extra memory: one block of logits and one of guide similarities, plus the two gradients.
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
  int64_t b, bw, pool, row_start, rows_per_block, strategy, guide_dim;
  double scale, margin, band;
  bool contrast_anchors, contrast_positives, compute_grad;
};

// x . y in one sequential loop, never inlined (one body whatever ISA clone calls it): the same bits for the same
// pair of rows, in either order, at any position.
template <typename G>
[[gnu::noinline]] G exact_dot(const G* x, const G* y, int64_t n) {
  G acc = 0;
  for (int64_t k = 0; k < n; ++k) acc += x[k] * y[k];
  return acc;
}

// In place on a row of guide similarities g (n, from BLAS): those within band of the bound replaced by exact_dot of
// the row's and the column's normalized guide rows, so that a tie with the threshold is decided as it is exactly.
template <typename G>
void settle_ties(G* g, int64_t n, G bound, G band, const G* row, const G* cols, int64_t dim) {
  for (int64_t j = 0; j < n; ++j) {
    if (std::abs(g[j] - bound) <= band) g[j] = exact_dot(row, cols + j * dim, dim);
  }
}

// One row of a block: logits scaled by s / (||row|| ||col||) and masked where the guide's similarity (settled:
// settle_ties) exceeds the bound; returns the row max. Branch-free over the columns.
template <typename T, typename G>
EMBEDLOSS_INLINE T scale_and_mask(T* __restrict__ x, const G* __restrict__ g, int64_t n, T row_factor,
                             const T* __restrict__ inv_col, G bound) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T m = neg_inf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const T v = g[j] > bound ? neg_inf : x[j] * row_factor * inv_col[j];
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
  const void *inv_a, *inv_c;  // clamped inverse norms of the model's rows (T)
  const void *ga, *gc;        // the guide's normalized rows (G)
};

// Rows [begin, end) of the block starting at local row r0.
template <typename T, typename G>
EMBEDLOSS_INLINE void gist_rows(const GistArgs& p, const GistNorms& nrm, int64_t r0, int64_t begin, int64_t end, T* lc,
                           T* laa, T* lpp, G* gc, G* gaa, G* gpp, double* row_loss) {
  const T* inv_a = static_cast<const T*>(nrm.inv_a);
  const T* inv_c = static_cast<const T*>(nrm.inv_c);
  const G* ga = static_cast<const G*>(nrm.ga);
  const G* gpool = static_cast<const G*>(nrm.gc);
  const int64_t Dg = p.guide_dim;
  const G band = static_cast<G>(p.band);
  const int64_t C = p.pool, B = p.b, Bw = p.bw;
  const T s = static_cast<T>(p.scale);
  const T s_over_b = static_cast<T>(p.scale / static_cast<double>(B));
  const G margin = static_cast<G>(p.margin);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row = r0 + i, own = p.row_start + row;
    T* x_c = lc + i * C;
    T* x_aa = p.contrast_anchors ? laa + i * B : nullptr;
    T* x_pp = p.contrast_positives ? lpp + i * Bw : nullptr;
    // the threshold, by the exact computation that decides every candidate near it
    const G* g_a = ga + row * Dg;
    const G* g_p = gpool + own * Dg;
    const G t = exact_dot(g_a, g_p, Dg);
    const G bound = p.strategy == kGistAbsolute ? t - margin : t - std::abs(t) * margin;
    settle_ties(gc + i * C, C, bound, band, g_a, gpool, Dg);
    if (x_aa) settle_ties(gaa + i * B, B, bound, band, g_a, ga, Dg);
    if (x_pp) settle_ties(gpp + i * Bw, Bw, bound, band, g_p, gpool, Dg);
    const T r_a = inv_a[row] * s;
    const T positive = x_c[own] * r_a * inv_c[own];
    T m = scale_and_mask(x_c, gc + i * C, C, r_a, inv_c, bound);
    x_c[own] = positive;  // the true positive is never masked
    m = std::max(m, positive);
    if (x_aa) m = std::max(m, scale_and_mask(x_aa, gaa + i * B, B, r_a, inv_a, bound));
    const T r_p = inv_c[own] * s;
    if (x_pp) m = std::max(m, scale_and_mask(x_pp, gpp + i * Bw, Bw, r_p, inv_c, bound));
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
                               float* lc, float* laa, float* lpp, float* gc, float* gaa, float* gpp,
                               double* row_loss) {
  gist_rows<float, float>(p, n, r0, begin, end, lc, laa, lpp, gc, gaa, gpp, row_loss);
}
EMBEDLOSS_CLONES void gist_rows_isa(const GistArgs& p, const GistNorms& n, int64_t r0, int64_t begin, int64_t end,
                               float* lc, float* laa, float* lpp, double* gc, double* gaa, double* gpp,
                               double* row_loss) {
  gist_rows<float, double>(p, n, r0, begin, end, lc, laa, lpp, gc, gaa, gpp, row_loss);
}
EMBEDLOSS_CLONES void gist_rows_isa(const GistArgs& p, const GistNorms& n, int64_t r0, int64_t begin, int64_t end,
                               double* lc, double* laa, double* lpp, float* gc, float* gaa, float* gpp,
                               double* row_loss) {
  gist_rows<double, float>(p, n, r0, begin, end, lc, laa, lpp, gc, gaa, gpp, row_loss);
}
EMBEDLOSS_CLONES void gist_rows_isa(const GistArgs& p, const GistNorms& n, int64_t r0, int64_t begin, int64_t end,
                               double* lc, double* laa, double* lpp, double* gc, double* gaa, double* gpp,
                               double* row_loss) {
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
                   const at::Tensor& cg, const at::Tensor& inv_a, const at::Tensor& inv_c, at::Tensor& ha,
                   at::Tensor& hc) {
  const int64_t R = p.rows_per_block, C = p.pool, B = p.b, Bw = p.bw;
  const at::Tensor pm = c.narrow(0, 0, Bw), pg = cg.narrow(0, 0, Bw);
  at::Tensor l_c = at::empty({R, C}, a.options());
  at::Tensor l_aa = p.contrast_anchors ? at::empty({R, B}, a.options()) : at::Tensor();
  at::Tensor l_pp = p.contrast_positives ? at::empty({R, Bw}, a.options()) : at::Tensor();
  at::Tensor g_c = at::empty({R, C}, ag.options());
  at::Tensor g_aa = p.contrast_anchors ? at::empty({R, B}, ag.options()) : at::Tensor();
  at::Tensor g_pp = p.contrast_positives ? at::empty({R, Bw}, ag.options()) : at::Tensor();
  const GistNorms norms{inv_a.data_ptr<T>(), inv_c.data_ptr<T>(), ag.data_ptr<G>(), cg.data_ptr<G>()};
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

// The guide's rows normalized as nn.CosineSimilarity does: x / max(||x||, eps) (equal rows give equal rows).
at::Tensor normalized_rows(const at::Tensor& x) {
  return (x / at::linalg_vector_norm(x, 2, {1}, /*keepdim=*/true).clamp_min(kGistEps)).contiguous();
}

// A bound on |BLAS product - exact_dot| (+ rounding) for unit rows of dim coordinates: each is within (dim + 2) u of
// the true dot; a reduced-precision fp32 product (tf32, bf16) adds 2^-8 per operand's rounding. Outside it, the
// product's decision is the exact one (the torch backend's tie_band).
double tie_band(int64_t dim, bool is_double) {
  const double u = is_double ? std::numeric_limits<double>::epsilon() / 2 : std::numeric_limits<float>::epsilon() / 2;
  const bool reduced =
      !is_double && at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
  return 3.0 * ((reduced ? std::ldexp(1.0, -8) : 0.0) + static_cast<double>(dim + 2) * u);
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
  const at::Tensor ag = normalized_rows(anchor_guide.detach().to(gwork));
  const at::Tensor cg = normalized_rows(candidates_guide.detach().to(gwork));
  auto [inv_a, tinv_a] = inverse_norms(a);
  auto [inv_c, tinv_c] = inverse_norms(c);

  GistArgs p;
  p.b = b;
  p.bw = bw;
  p.pool = candidates.size(0);
  p.row_start = row_start;
  p.strategy = margin_strategy;
  p.scale = scale;
  p.margin = margin;
  p.guide_dim = ag.size(1);
  p.band = tie_band(p.guide_dim, gwork == at::kDouble);
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
      loss_sum = gist_blocks<T, double>(p, a, c, ag, cg, inv_a, inv_c, ha, hc);
    } else {
      loss_sum = gist_blocks<T, float>(p, a, c, ag, cg, inv_a, inv_c, ha, hc);
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
