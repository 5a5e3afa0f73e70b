// Fused InfoNCE / MNRL on CPU: loss and d loss / d (q, a) in one pass over row blocks.
//
// Per block of anchor rows g (global indices), with Q, A the (normalized) queries and candidates, P = A[:Bq]:
//   L_qd = s Q_g A^T (+ alpha sg(Q_g A^T) on the penalized columns)   (R, C)
//   L_qq = s Q_g Q^T, column g masked                                (R, Bq)
//   L_dq = s P_g Q^T                                                 (R, Bq)
//   L_dd = s P_g A^T, columns g + c Bq masked                        (R, C)
//   loss_g = LSE(blocks) - s Q_g . A_g       (joint; per_direction: mean of per-block LSEs)
//   G = (softmax - onehot(positive)) s / row_count   (the penalty is stop-gradient, so d logit / d sim = s)
//   dQ_g += G_qd A + G_qq Q;  dA += G_qd^T Q_g + G_dd^T P_g;  dP_g += G_dq Q + G_dd A;  dQ += G_qq^T Q_g + G_dq^T P_g
//
// Cosine without normalized copies: the products run on the raw rows and the row pass applies 1/||x_i|| 1/||y_j||
// (n_* below). The gradient matrix becomes H = diag(1/n_row) G diag(1/n_col), so H Y and H^T X on the raw rows give
// dX_hat / n_X and dY_hat / n_Y: the accumulators hold d/dv_hat / ||v||, and the normalization's backward turns
// that into d/dv = acc - v <v, acc> / ||v||^2.
//
// CLIP / MNSRL (directions exactly query_to_doc | doc_to_query, no hardness, every row, with the gradient) take the
// two-pass symmetric schedule instead (infonce_sym_blocks below): 4 products per row block, not 6.
//
// One block of rows at a time: its products run in ATen's multi-threaded BLAS, the fused row pass (scale, hardness,
// masks, LSE, softmax - onehot, in place on the logits, in cache-sized rows) over at::parallel_for, then the gradient
// products accumulate straight into dQ and dA. Extra memory: one block of logits (EMBEDLOSS_BLOCK_MIB) plus dQ and
// dA, never B x C.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include <torch/library.h>

#include "kernels.h"
#include "simd.h"

namespace embedloss {
namespace {

template <typename T>
EMBEDLOSS_INLINE void scale_row(T* __restrict__ x, int64_t n, T s) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= s;
}

// x[j] *= f * col[j] (col may be null: x[j] *= f).
template <typename T>
EMBEDLOSS_INLINE void scale_row_cols(T* __restrict__ x, int64_t n, T f, const T* __restrict__ col) {
  if (col == nullptr) return scale_row(x, n, f);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= f * col[j];
}

template <typename T>
EMBEDLOSS_INLINE T row_max(const T* __restrict__ x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = simd_max(m, x[j]);
  return m;
}

struct InfonceArgs {
  int64_t bq, n_docs, cols, dim, row_start, row_count, rows_per_block;
  double scale, alpha;
  int64_t hardness_mode;
  bool joint, compute_grad, use_qq, use_dq, use_dd;
  at::Tensor nq, na, inv_nq, inv_na;  // max(||row||, eps) of q and a and its inverse under cosine, else undefined
};

// Rows [begin, end) of one block: scale, hardness, masks, the exact LSE and (with the gradient) the logits turned
// into H in place; per-row losses go to row_loss. Force-inlined into the per-ISA clones below.
template <typename T>
EMBEDLOSS_INLINE void row_range(const InfonceArgs& p, int64_t r0, int64_t begin, int64_t end, T* qd, T* qq, T* dq,
                                T* dd, double* row_loss, T* own_sim) {
  const int64_t C = p.cols, Bq = p.bq, K = p.n_docs;
  const T s = static_cast<T>(p.scale);
  const T s_hard = static_cast<T>(p.scale + p.alpha);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int n_blocks = 1 + p.use_qq + p.use_dq + p.use_dd;
  const T inv_rows = static_cast<T>(1.0 / static_cast<double>(p.row_count));
  const T weight = s * inv_rows / static_cast<T>(p.joint ? 1 : n_blocks);
  const T* inv_nq = p.inv_nq.defined() ? p.inv_nq.data_ptr<T>() : nullptr;
  const T* inv_na = p.inv_na.defined() ? p.inv_na.data_ptr<T>() : nullptr;

  for (int64_t i = begin; i < end; ++i) {
    const int64_t g = r0 + i;
    T* x_qd = qd + i * C;
    T* x_qq = p.use_qq ? qq + i * Bq : nullptr;
    T* x_dq = p.use_dq ? dq + i * Bq : nullptr;
    T* x_dd = p.use_dd ? dd + i * C : nullptr;

    const T r_q = inv_nq ? inv_nq[g] : T(1);  // row factors: the anchor is q_g (qd, qq) or p_g (dq, dd)
    const T r_p = inv_na ? inv_na[g] : T(1);
    for (int64_t c = 0; c < K; ++c) own_sim[c] = x_qd[g + c * Bq] * r_q * (inv_na ? inv_na[g + c * Bq] : T(1));
    const T positive = own_sim[0] * s;
    switch (p.hardness_mode) {
      case kHardnessHard:  // only the query's own hard negatives are boosted
        scale_row_cols(x_qd, C, s * r_q, inv_na);
        for (int64_t c = 1; c < K; ++c) x_qd[g + c * Bq] = own_sim[c] * s_hard;
        break;
      case kHardnessInBatch:  // every column except the query's own docs
        scale_row_cols(x_qd, C, s_hard * r_q, inv_na);
        for (int64_t c = 0; c < K; ++c) x_qd[g + c * Bq] = own_sim[c] * s;
        break;
      case kHardnessAll:  // every column except the query's own positive
        scale_row_cols(x_qd, C, s_hard * r_q, inv_na);
        x_qd[g] = positive;
        break;
      default:
        scale_row_cols(x_qd, C, s * r_q, inv_na);
    }
    if (p.use_qq) {
      scale_row_cols(x_qq, Bq, s * r_q, inv_nq);
      x_qq[g] = neg_inf;
    }
    if (p.use_dq) scale_row_cols(x_dq, Bq, s * r_p, inv_nq);
    if (p.use_dd) {
      scale_row_cols(x_dd, C, s * r_p, inv_na);
      for (int64_t c = 0; c < K; ++c) x_dd[g + c * Bq] = neg_inf;
    }

    T m_qd = row_max(x_qd, C);
    T m_qq = p.use_qq ? row_max(x_qq, Bq) : neg_inf;
    T m_dq = p.use_dq ? row_max(x_dq, Bq) : neg_inf;
    T m_dd = p.use_dd ? row_max(x_dd, C) : neg_inf;
    if (p.joint) m_qd = m_qq = m_dq = m_dd = std::max(std::max(m_qd, m_qq), std::max(m_dq, m_dd));
    T sum_qd = exp_shift_sum(x_qd, C, m_qd);
    T sum_qq = p.use_qq ? exp_shift_sum(x_qq, Bq, m_qq) : T(0);
    T sum_dq = p.use_dq ? exp_shift_sum(x_dq, Bq, m_dq) : T(0);
    T sum_dd = p.use_dd ? exp_shift_sum(x_dd, C, m_dd) : T(0);
    double lse;
    if (p.joint) {
      const T total = sum_qd + sum_qq + sum_dq + sum_dd;
      lse = static_cast<double>(m_qd) + std::log(static_cast<double>(total));
      sum_qd = sum_qq = sum_dq = sum_dd = total;
    } else {
      lse = static_cast<double>(m_qd) + std::log(static_cast<double>(sum_qd));
      if (p.use_qq) lse += static_cast<double>(m_qq) + std::log(static_cast<double>(sum_qq));
      if (p.use_dq) lse += static_cast<double>(m_dq) + std::log(static_cast<double>(sum_dq));
      if (p.use_dd) lse += static_cast<double>(m_dd) + std::log(static_cast<double>(sum_dd));
      lse /= n_blocks;
    }
    row_loss[i] = lse - static_cast<double>(positive);
    if (!p.compute_grad) continue;

    // H = diag(r) (softmax - onehot) s / row_count diag(c)
    scale_row_cols(x_qd, C, weight / sum_qd * r_q, inv_na);
    x_qd[g] -= s * inv_rows * r_q * (inv_na ? inv_na[g] : T(1));
    if (p.use_qq) scale_row_cols(x_qq, Bq, weight / sum_qq * r_q, inv_nq);
    if (p.use_dq) scale_row_cols(x_dq, Bq, weight / sum_dq * r_p, inv_nq);
    if (p.use_dd) scale_row_cols(x_dd, C, weight / sum_dd * r_p, inv_na);
  }
}

EMBEDLOSS_CLONES void row_range_isa(const InfonceArgs& p, int64_t r0, int64_t begin, int64_t end, float* qd,
                                    float* qq, float* dq, float* dd, double* row_loss, float* own_sim) {
  row_range<float>(p, r0, begin, end, qd, qq, dq, dd, row_loss, own_sim);
}

EMBEDLOSS_CLONES void row_range_isa(const InfonceArgs& p, int64_t r0, int64_t begin, int64_t end, double* qd,
                                    double* qq, double* dq, double* dd, double* row_loss, double* own_sim) {
  row_range<double>(p, r0, begin, end, qd, qq, dq, dd, row_loss, own_sim);
}

// The row pass of one block: its n rows are independent, spread over threads.
template <typename T>
void infonce_row_pass(const InfonceArgs& p, int64_t r0, int64_t n, T* qd, T* qq, T* dq, T* dd, double* row_loss) {
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    std::vector<T> own_sim(p.n_docs);
    row_range_isa(p, r0, begin, end, qd, qq, dq, dd, row_loss, own_sim.data());
  });
}

// Every block in turn: its products (ATen's multi-threaded BLAS), the parallel row pass, then the gradient products
// straight into dq / da. Returns the sum of the row losses (summed in row order: deterministic for any thread count).
template <typename T>
double infonce_blocks(const InfonceArgs& p, const at::Tensor& qf, const at::Tensor& af, at::Tensor& dq,
                      at::Tensor& da) {
  const auto opts = qf.options();
  const int64_t R = p.rows_per_block, C = p.cols, Bq = p.bq;
  at::Tensor l_qd = at::empty({R, C}, opts);
  at::Tensor l_qq = p.use_qq ? at::empty({R, Bq}, opts) : at::Tensor();
  at::Tensor l_dq = p.use_dq ? at::empty({R, Bq}, opts) : at::Tensor();
  at::Tensor l_dd = p.use_dd ? at::empty({R, C}, opts) : at::Tensor();
  std::vector<double> row_loss(R);
  double loss_sum = 0.0;

  for (int64_t r0 = p.row_start; r0 < p.row_start + p.row_count; r0 += R) {
    const int64_t n = std::min(R, p.row_start + p.row_count - r0);
    const at::Tensor q_blk = qf.narrow(0, r0, n);
    const at::Tensor p_blk = af.narrow(0, r0, n);
    at::Tensor g_qd = l_qd.narrow(0, 0, n);
    at::Tensor g_qq = p.use_qq ? l_qq.narrow(0, 0, n) : at::Tensor();
    at::Tensor g_dq = p.use_dq ? l_dq.narrow(0, 0, n) : at::Tensor();
    at::Tensor g_dd = p.use_dd ? l_dd.narrow(0, 0, n) : at::Tensor();

    // -- similarities: the four products of the block --
    at::mm_out(g_qd, q_blk, af.t());
    if (p.use_qq) at::mm_out(g_qq, q_blk, qf.t());
    if (p.use_dq) at::mm_out(g_dq, p_blk, qf.t());
    if (p.use_dd) at::mm_out(g_dd, p_blk, af.t());

    infonce_row_pass<T>(p, r0, n, g_qd.data_ptr<T>(), p.use_qq ? g_qq.data_ptr<T>() : nullptr,
                        p.use_dq ? g_dq.data_ptr<T>() : nullptr, p.use_dd ? g_dd.data_ptr<T>() : nullptr,
                        row_loss.data());
    for (int64_t i = 0; i < n; ++i) loss_sum += row_loss[i];
    if (!p.compute_grad) continue;

    // -- the gradient products --
    at::Tensor dq_rows = dq.narrow(0, r0, n);
    at::Tensor dp_rows = da.narrow(0, r0, n);
    dq_rows.addmm_(g_qd, af);
    da.addmm_(g_qd.t(), q_blk);
    if (p.use_qq) {
      dq_rows.addmm_(g_qq, qf);
      dq.addmm_(g_qq.t(), q_blk);
    }
    if (p.use_dq) {
      dp_rows.addmm_(g_dq, qf);
      dq.addmm_(g_dq.t(), p_blk);
    }
    if (p.use_dd) {
      dp_rows.addmm_(g_dd, af);
      da.addmm_(g_dd.t(), p_blk);
    }
  }
  return loss_sum;
}

// ---- The symmetric schedule: directions exactly query_to_doc | doc_to_query (CLIP, MNSRL) ----
//
// L_dq's rows are the columns of the positive block of S = s Q A^T (Q, A normalized under cosine): L_dq[j, i] =
// S[i, j] for i, j < Bq. With r_i the LSE of row i of S (query_to_doc) and c_j the LSE of column j < Bq of S over
// the Bq rows (doc j's doc_to_query row), every term needs S alone (w = 1/2 per_direction, 1 joint):
//   per_direction: a_i = r_i, b_j = c_j;                    loss = mean_i ((r_i + c_i) / 2 - S_ii)
//   joint:         a_i = b_i = J_i = logaddexp(r_i, c_i);   loss = mean_i (J_i - S_ii)
//   G_ij = w exp(S_ij - a_i) + [j < Bq] w exp(S_ij - b_j) - [i == j]   (d loss / d S_ij times row_count)
// Pass 1, one product per row block: S_g = s Q_g A^T, each row's max and sum of exp (exact: the block has whole
// rows), the positive block's column max and sum of exp, merged across blocks (rescaled to the new running max).
// Pass 2, three products per row block: S_g again, H = G s / row_count (with the cosine factors) in place,
// dQ_g += H A, dA += H^T Q_g. Four matmul-equivalents instead of six. Every exp is shifted by the exact max of its
// row or column (as the general pass) and the normalization is a multiplier computed in double, so nothing overflows
// and the rounding matches the general pass. Used only with every row local (row_start 0, row_count Bq: the
// columns' LSEs need every row), no hardness penalty, and the gradient; anything else runs infonce_blocks.
struct SymStats {
  std::vector<double> row_max, row_sum, col_max, col_sum, positive;
  explicit SymStats(int64_t bq)
      : row_max(bq), row_sum(bq), col_max(bq, -std::numeric_limits<double>::infinity()), col_sum(bq, 0.0),
        positive(bq) {}
};

template <typename T>
EMBEDLOSS_INLINE T exp_of(T x);
template <>
EMBEDLOSS_INLINE float exp_of<float>(float x) {
  return exp_approx(x);
}
template <>
EMBEDLOSS_INLINE double exp_of<double>(double x) {
  return std::exp(x);
}

// sum_j exp(x[j] - m), x unchanged.
template <typename T>
EMBEDLOSS_INLINE T exp_shift_sum_keep(const T* __restrict__ x, int64_t n, T m) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_of<T>(x[j] - m);
  return sum;
}

// Pass 1, rows [begin, end) of a block starting at global row r0: the logits in place, each row's max, sum and
// positive.
template <typename T>
EMBEDLOSS_INLINE void sym_rows_stats(const InfonceArgs& p, int64_t r0, int64_t begin, int64_t end, T* l,
                                     SymStats& st) {
  const int64_t C = p.cols;
  const T s = static_cast<T>(p.scale);
  const T* inv_nq = p.inv_nq.defined() ? p.inv_nq.data_ptr<T>() : nullptr;
  const T* inv_na = p.inv_na.defined() ? p.inv_na.data_ptr<T>() : nullptr;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t g = r0 + i;
    T* x = l + i * C;
    scale_row_cols(x, C, s * (inv_nq ? inv_nq[g] : T(1)), inv_na);
    const T m = row_max(x, C);
    st.row_max[g] = static_cast<double>(m);
    st.row_sum[g] = static_cast<double>(exp_shift_sum_keep(x, C, m));
    st.positive[g] = static_cast<double>(x[g]);
  }
}

// Pass 1, columns [begin, end) of the positive block over the block's n rows: merged into the running max and sum.
template <typename T>
EMBEDLOSS_INLINE void sym_cols_stats(const InfonceArgs& p, int64_t n, int64_t begin, int64_t end, const T* l,
                                     SymStats& st, T* bmax, T* bsum) {
  const int64_t C = p.cols, w = end - begin;
  for (int64_t j = 0; j < w; ++j) bmax[j] = static_cast<T>(st.col_max[begin + j]);
  for (int64_t i = 0; i < n; ++i) {
    const T* x = l + i * C + begin;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) bmax[j] = simd_max(bmax[j], x[j]);
  }
  for (int64_t j = 0; j < w; ++j) {
    const double old_max = st.col_max[begin + j], new_max = static_cast<double>(bmax[j]);
    if (new_max != old_max) st.col_sum[begin + j] *= std::exp(old_max - new_max);  // 0 on the first block
    st.col_max[begin + j] = new_max;
    bsum[j] = 0;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T* x = l + i * C + begin;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) bsum[j] += exp_of<T>(x[j] - bmax[j]);
  }
  for (int64_t j = 0; j < w; ++j) st.col_sum[begin + j] += static_cast<double>(bsum[j]);
}

// Pass 2, rows [begin, end): the logits again, then H in place. row_coef[g] = (s / row_count) w exp(m_g - a_g),
// col_coef[j] = (s / row_count) w exp(M_j - b_j), so that w exp(S - a) = coef exp(S - max) with the exact max.
template <typename T>
EMBEDLOSS_INLINE void sym_rows_grad(const InfonceArgs& p, int64_t r0, int64_t begin, int64_t end, T* l,
                                    const T* row_max_t, const T* row_coef, const T* col_max_t, const T* col_coef) {
  const int64_t C = p.cols, Bq = p.bq;
  const T s = static_cast<T>(p.scale);
  const T onehot = static_cast<T>(p.scale / static_cast<double>(p.row_count));
  const T* inv_nq = p.inv_nq.defined() ? p.inv_nq.data_ptr<T>() : nullptr;
  const T* inv_na = p.inv_na.defined() ? p.inv_na.data_ptr<T>() : nullptr;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t g = r0 + i;
    T* x = l + i * C;
    const T r_q = inv_nq ? inv_nq[g] : T(1);
    scale_row_cols(x, C, s * r_q, inv_na);
    const T m = row_max_t[g], rc = row_coef[g];
#pragma omp simd
    for (int64_t j = 0; j < Bq; ++j) x[j] = rc * exp_of<T>(x[j] - m) + col_coef[j] * exp_of<T>(x[j] - col_max_t[j]);
#pragma omp simd
    for (int64_t j = Bq; j < C; ++j) x[j] = rc * exp_of<T>(x[j] - m);
    x[g] -= onehot;
    if (inv_na != nullptr) scale_row_cols(x, C, r_q, inv_na);  // H = diag(r) G diag(c)
  }
}

EMBEDLOSS_CLONES void sym_rows_stats_isa(const InfonceArgs& p, int64_t r0, int64_t b, int64_t e, float* l,
                                         SymStats& st) {
  sym_rows_stats<float>(p, r0, b, e, l, st);
}
EMBEDLOSS_CLONES void sym_rows_stats_isa(const InfonceArgs& p, int64_t r0, int64_t b, int64_t e, double* l,
                                         SymStats& st) {
  sym_rows_stats<double>(p, r0, b, e, l, st);
}
EMBEDLOSS_CLONES void sym_cols_stats_isa(const InfonceArgs& p, int64_t n, int64_t b, int64_t e, const float* l,
                                         SymStats& st, float* bmax, float* bsum) {
  sym_cols_stats<float>(p, n, b, e, l, st, bmax, bsum);
}
EMBEDLOSS_CLONES void sym_cols_stats_isa(const InfonceArgs& p, int64_t n, int64_t b, int64_t e, const double* l,
                                         SymStats& st, double* bmax, double* bsum) {
  sym_cols_stats<double>(p, n, b, e, l, st, bmax, bsum);
}
EMBEDLOSS_CLONES void sym_rows_grad_isa(const InfonceArgs& p, int64_t r0, int64_t b, int64_t e, float* l,
                                        const float* rm, const float* rc, const float* cm, const float* cc) {
  sym_rows_grad<float>(p, r0, b, e, l, rm, rc, cm, cc);
}
EMBEDLOSS_CLONES void sym_rows_grad_isa(const InfonceArgs& p, int64_t r0, int64_t b, int64_t e, double* l,
                                        const double* rm, const double* rc, const double* cm, const double* cc) {
  sym_rows_grad<double>(p, r0, b, e, l, rm, rc, cm, cc);
}

// The two passes over every block; returns the sum of the row losses (in row order: deterministic).
template <typename T>
double infonce_sym_blocks(const InfonceArgs& p, const at::Tensor& qf, const at::Tensor& af, at::Tensor& dq,
                          at::Tensor& da) {
  const int64_t R = p.rows_per_block, C = p.cols, Bq = p.bq;
  at::Tensor l_blk = at::empty({R, C}, qf.options());
  SymStats st(Bq);

  // -- pass 1: statistics --
  for (int64_t r0 = 0; r0 < Bq; r0 += R) {
    const int64_t n = std::min(R, Bq - r0);
    at::Tensor s_blk = l_blk.narrow(0, 0, n);
    at::mm_out(s_blk, qf.narrow(0, r0, n), af.t());
    T* l = s_blk.data_ptr<T>();
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) { sym_rows_stats_isa(p, r0, begin, end, l, st); });
    at::parallel_for(0, Bq, 256, [&](int64_t begin, int64_t end) {
      std::vector<T> bmax(end - begin), bsum(end - begin);
      sym_cols_stats_isa(p, n, begin, end, l, st, bmax.data(), bsum.data());
    });
  }

  // -- the loss, and the multipliers of pass 2 --
  const double w = p.joint ? 1.0 : 0.5, f = p.scale / static_cast<double>(p.row_count);
  std::vector<T> row_max_t(Bq), row_coef(Bq), col_max_t(Bq), col_coef(Bq);
  double loss_sum = 0.0;
  for (int64_t i = 0; i < Bq; ++i) {
    const double r = st.row_max[i] + std::log(st.row_sum[i]);
    const double c = st.col_max[i] + std::log(st.col_sum[i]);
    double a, b;
    if (p.joint) {
      a = b = std::max(r, c) + std::log1p(std::exp(-std::abs(r - c)));  // logaddexp(r, c)
      loss_sum += a - st.positive[i];
    } else {
      a = r;
      b = c;
      loss_sum += 0.5 * (r + c) - st.positive[i];
    }
    row_max_t[i] = static_cast<T>(st.row_max[i]);
    col_max_t[i] = static_cast<T>(st.col_max[i]);
    row_coef[i] = static_cast<T>(f * w * std::exp(st.row_max[i] - a));
    col_coef[i] = static_cast<T>(f * w * std::exp(st.col_max[i] - b));
  }

  // -- pass 2: the gradient --
  for (int64_t r0 = 0; r0 < Bq; r0 += R) {
    const int64_t n = std::min(R, Bq - r0);
    const at::Tensor q_blk = qf.narrow(0, r0, n);
    at::Tensor h = l_blk.narrow(0, 0, n);
    at::mm_out(h, q_blk, af.t());
    T* l = h.data_ptr<T>();
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      sym_rows_grad_isa(p, r0, begin, end, l, row_max_t.data(), row_coef.data(), col_max_t.data(), col_coef.data());
    });
    dq.narrow(0, r0, n).addmm_(h, af);
    da.addmm_(h.t(), q_blk);
  }
  return loss_sum;
}

// acc holds d/dv_hat / ||v|| per row; in place it becomes d/dv = acc - v_hat <v_hat, acc> with v_hat = v / ||v||
// (divided, as F.normalize does, so that e.g. D = 1 cancels exactly). Rows whose norm was clamped at eps take no
// radial part, as F.normalize's gradient.
template <typename T>
void scaled_normalize_backward_(const at::Tensor& v, const at::Tensor& norm, at::Tensor& acc) {
  const int64_t rows = v.size(0), dim = v.size(1);
  const T* vp = v.data_ptr<T>();
  const T* np = norm.data_ptr<T>();
  T* ap = acc.data_ptr<T>();
  const T eps = static_cast<T>(kEps);
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (np[i] <= eps) continue;
      const T* x = vp + i * dim;
      T* g = ap + i * dim;
      const T n = np[i];
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < dim; ++j) dot += (x[j] / n) * g[j];
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) g[j] -= (x[j] / n) * dot;
    }
  });
}

}  // namespace

double block_budget_mib() {
  double mib = 32.0;  // the Python layer validates EMBEDLOSS_BLOCK_MIB (torch_ops.block_budget_bytes) before the op
  if (const char* env = std::getenv("EMBEDLOSS_BLOCK_MIB")) {
    char* end = nullptr;
    const double v = std::strtod(env, &end);
    if (end != env) {
      TORCH_CHECK(v > 0 && std::isfinite(v), "EMBEDLOSS_BLOCK_MIB must be a positive number of MiB, got '", env, "'");
      mib = v;
    }
  }
  return mib;
}

// Rows per block: the block's logits (R x width) take a quarter of the EMBEDLOSS_BLOCK_MIB budget (32 MiB by
// default, the torch backend's rule: its four block-sized buffers share the budget; here the logits are the only one
// and the rest is left to BLAS packing), R a multiple of 8 for the BLAS. Measured at B=8192, N=16384, D=256 on 2
// cores: 8 MiB of logits (R=128) runs as fast as 16 or 32 MiB, and keeps peak extra memory under 0.05x
// sentence-transformers'.
int64_t auto_block_rows(int64_t width, int64_t elem, int64_t row_count) {
  int64_t rows = static_cast<int64_t>(block_budget_mib() * (1 << 20) / 4) / std::max<int64_t>(width * elem, 1);
  rows = rows >= 16 ? rows / 8 * 8 : std::max<int64_t>(rows, 1);
  return std::max<int64_t>(1, std::min(rows, row_count));
}

std::tuple<at::Tensor, at::Tensor> normalize_rows(const at::Tensor& x) {
  at::Tensor norm = x.norm(2, {1}, /*keepdim=*/true).clamp_min_(kEps);
  return {x / norm, norm};
}

at::Tensor normalize_rows_backward_(const at::Tensor& x_hat, const at::Tensor& norm, at::Tensor& grad_hat) {
  at::Tensor radial = (x_hat * grad_hat).sum({1}, /*keepdim=*/true).masked_fill_(norm <= kEps, 0.0);
  return grad_hat.addcmul_(x_hat, radial, -1.0).div_(norm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_cpu(
    const at::Tensor& q, const at::Tensor& a, int64_t row_start, int64_t row_count, double scale, bool cosine,
    int64_t directions, bool joint, int64_t hardness_mode, double hardness_strength, bool compute_grad,
    int64_t block_rows) {
  TORCH_CHECK(q.dim() == 2 && a.dim() == 2, "embedloss_cpp::infonce: q and a must be 2-D, got q of shape ",
              q.sizes(), " and a of shape ", a.sizes());
  TORCH_CHECK(q.device().is_cpu() && a.device().is_cpu(), "embedloss_cpp::infonce: q and a must be CPU tensors");
  TORCH_CHECK(q.scalar_type() == a.scalar_type(), "embedloss_cpp::infonce: q and a must share a dtype, got ",
              q.scalar_type(), " and ", a.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "embedloss_cpp::infonce: q must be floating point, got ",
              q.scalar_type());
  const int64_t bq = q.size(0), dim = q.size(1);
  TORCH_CHECK(bq > 0 && a.size(1) == dim && a.size(0) % bq == 0 && a.size(0) >= bq,
              "embedloss_cpp::infonce: a must be (K*Bq, D) for q (Bq, D) = ", q.sizes(), ", got ", a.sizes());
  TORCH_CHECK(row_count > 0 && row_start >= 0 && row_start + row_count <= bq,
              "embedloss_cpp::infonce: rows [row_start, row_start + row_count) must lie in [0, ", bq, "), got ",
              row_start, " and ", row_count);
  TORCH_CHECK(directions & kQueryToDoc, "embedloss_cpp::infonce: directions must include query_to_doc (bit 1)");
  TORCH_CHECK(hardness_mode >= kHardnessNone && hardness_mode <= kHardnessAll,
              "embedloss_cpp::infonce: hardness_mode must be 0..3, got ", hardness_mode);

  const auto work = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // fp32/fp64 inputs are used in place (no copy); fp16/bf16 are widened once.
  const at::Tensor q_in = q.detach().to(work).contiguous(), a_in = a.detach().to(work).contiguous();

  InfonceArgs p;
  p.bq = bq;
  p.n_docs = a.size(0) / bq;
  p.cols = a.size(0);
  p.dim = dim;
  p.row_start = row_start;
  p.row_count = row_count;
  p.scale = scale;
  p.hardness_mode = hardness_strength > 0 ? hardness_mode : kHardnessNone;
  p.alpha = p.hardness_mode != kHardnessNone ? hardness_strength : 0.0;
  p.joint = joint;
  p.compute_grad = compute_grad;
  p.use_qq = directions & kQueryToQuery;
  p.use_dq = directions & kDocToQuery;
  p.use_dd = directions & kDocToDoc;
  // Cosine runs its products on the raw rows (no normalized copies), scaled by 1/||row|| in the row pass. Rows so
  // long that a raw product could overflow (||q|| ||a|| near the dtype's max, e.g. 1e19 in fp32) are normalized
  // first, exactly as F.normalize does (so a norm that itself overflows gives zeros, as there): the kernel then sees
  // unit rows, and d/dv = (d/du) / ||v|| after the normalization's backward. Rows clamped at eps keep their clamp.
  at::Tensor rescale_q, rescale_a;  // the norms divided out up front, when that was needed
  at::Tensor qf = q_in, af = a_in;
  if (cosine) {
    p.nq = qf.norm(2, {1}).clamp_min_(kEps);
    p.na = af.norm(2, {1}).clamp_min_(kEps);
    const double largest = std::max(p.nq.max().item<double>(), p.na.max().item<double>());
    const double limit = std::sqrt((work == at::kDouble ? std::numeric_limits<double>::max()
                                                        : static_cast<double>(std::numeric_limits<float>::max())) / 16);
    if (!(largest <= limit)) {
      rescale_q = p.nq;
      rescale_a = p.na;
      qf = qf / rescale_q.unsqueeze(1);
      af = af / rescale_a.unsqueeze(1);
      // unit rows now; rows clamped at eps keep a norm <= eps so that their backward takes no radial part
      p.nq = at::where(rescale_q <= kEps, rescale_q, at::ones_like(rescale_q));
      p.na = at::where(rescale_a <= kEps, rescale_a, at::ones_like(rescale_a));
      p.inv_nq = at::ones_like(p.nq);
      p.inv_na = at::ones_like(p.na);
    } else {
      p.inv_nq = p.nq.reciprocal();
      p.inv_na = p.na.reciprocal();
    }
  }
  // CLIP / MNSRL over the whole batch: the two-pass symmetric schedule (infonce_sym_blocks), 4 products, not 6. Its
  // blocks keep the general schedule's rows (width C + Bq), so its one buffer is smaller. Measured at B=N=8192,
  // D=512 (2 cores, loaded): 256 rows ran ~25% faster than 128, but MKL then packs the whole A^T for S (+8 MiB at
  // >= 192 rows), and peak extra memory went from 0.038x to 0.050x OpenCLIP's.
  const bool symmetric = directions == (kQueryToDoc | kDocToQuery) && p.hardness_mode == kHardnessNone &&
                         compute_grad && row_start == 0 && row_count == bq;
  const int64_t width = p.cols * (1 + p.use_dd) + bq * (p.use_qq + p.use_dq);
  p.rows_per_block = block_rows > 0 ? std::min(block_rows, row_count)
                                    : auto_block_rows(width, at::elementSize(work), row_count);

  at::Tensor dq = compute_grad ? at::zeros_like(qf) : at::Tensor();
  at::Tensor da = compute_grad ? at::zeros_like(af) : at::Tensor();
  double loss_sum = 0.0;
  AT_DISPATCH_FLOATING_TYPES(qf.scalar_type(), "embedloss_infonce_cpu", [&] {
    loss_sum = symmetric ? infonce_sym_blocks<scalar_t>(p, qf, af, dq, da)
                         : infonce_blocks<scalar_t>(p, qf, af, dq, da);
  });
  at::Tensor loss = at::scalar_tensor(loss_sum / static_cast<double>(row_count), q.options().dtype(work));
  if (!compute_grad) {
    // Distinct tensors: outputs of an op must not alias each other.
    return {loss, at::empty({0}, q.options()), at::empty({0}, q.options()), at::empty({0}, loss.options())};
  }
  // d loss / d scale: each logit s sim(v, w) sends s G sim to both of its vectors, so sum <v, d/dv> over the rows
  // the products ran on is 2 s dL/ds; under cosine the accumulators hold (d/dv_hat) / ||v||, and <v, acc> is
  // <v_hat, d/dv_hat> again. scale > 0 here (the Python layer routes 0 to the direct computation).
  at::Tensor grad_scale = (at::vdot(qf.reshape(-1), dq.reshape(-1)) + at::vdot(af.reshape(-1), da.reshape(-1)))
                              .div_(2.0 * scale);
  if (cosine) {
    AT_DISPATCH_FLOATING_TYPES(qf.scalar_type(), "embedloss_infonce_normalize_backward", [&] {
      scaled_normalize_backward_<scalar_t>(qf, p.nq, dq);
      scaled_normalize_backward_<scalar_t>(af, p.na, da);
    });
    if (rescale_q.defined()) {
      dq.div_(rescale_q.unsqueeze(1));
      da.div_(rescale_a.unsqueeze(1));
    }
  }
  return {loss, dq.to(q.scalar_type()), da.to(a.scalar_type()), grad_scale};
}

}  // namespace embedloss

// The CPU kernel of embedloss_cpp::infonce. The schema (embedloss_kernels/core/contract.py), the fake implementation and
// the autograd are registered from Python (embedloss_kernels/ops).
TORCH_LIBRARY_IMPL(embedloss_cpp, CPU, m) { m.impl("infonce", &embedloss::infonce_cpu); }
