// Fused Matryoshka MNRL on CPU (embedloss_cpp::matryoshka): every prefix dim's loss and the gradients w.r.t. the raw
// full-dimension embeddings, with the products of one MNRL at full D.
//
// Dims d_1 < ... < d_m, segments seg_k = [d_{k-1}, d_k). Per block of anchor rows and per direction block
// (rows R = q or p, columns C = a or q):
//   P_k = P_{k-1} + R[:, seg_k] C[:, seg_k]^T                  raw prefix products, one pass over D   (m x n x cols)
//                                                              (m GEMMs write the segment products; the row pass
//                                                              sums them row by row, in cache: no GEMM reads C)
//   cos_k = P_k / (|r_{:d_k}| |c_{:d_k}|);  S_k = s cos_k (+ alpha sg(cos_k) on penalized columns), masks
//   loss += w_k (LSE(S_k) - S_k[positive]) / rows;  G_k = s w_k (softmax(S_k) - onehot) / rows  (= d loss / d cos_k)
// Back through the per-prefix normalization, segment k collects every dim d_j >= d_k:
//   C_k = sum_{j >= k} G_j / (|r_{:d_j}| |c_{:d_j}|)          suffix sum, written over P_k by the row pass
//   dR[:, seg_k] += C_k C[:, seg_k];  dC[:, seg_k] += C_k^T R[:, seg_k]
//   dR[:, seg_k] -= R[:, seg_k] rho_k,  rho_k = sum_{j >= k} (sum_cols G_j cos_j) / |r_{:d_j}|^2    (and column-wise)
//   d loss / d s = sum_k sum(G_k cos_k) / s                  (the penalty is stop-gradient: the radial row sums' total)
//
// The row pass runs over rows in parallel (at::parallel_for); for each row it walks the dims from the largest down,
// so that C_k = Gh_k + C_{k+1} is formed in the same pass that computes dim k's LSE. Column radial sums are kept per
// thread and added in thread order. The products run in ATen's multi-threaded BLAS on strided column slices (no
// copies). Extra memory: m block-sized product buffers (the EMBEDLOSS_BLOCK_MIB budget) plus dQ and dA.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace embedloss {
namespace {

// One direction block of the block: raw products (m, n, cols), its row / column inverse norms per dim, and whether the
// rows / columns are queries (radial sums go to rad_q) or candidates (rad_a).
template <typename T>
struct Direction {
  T* prods;
  int64_t cols;
  const T* inv_row;  // (m, rows of the source) indexed [k * stride_row + g]
  int64_t stride_row;
  const T* inv_col;  // (m, cols)
  bool rows_are_q, cols_are_q;
  int64_t offset;  // in the per-thread scratch row and column accumulators
};

struct Params {
  int64_t m, bq, n_docs, row_count, width, hardness_mode, block;  // block: rows per product buffer
  double scale, alpha, inv_rows;
  bool joint, compute_grad;
};

// Rows [begin, end) of the block starting at global row r0: every dim's exact LSE, the row losses and (with the
// gradient) C_k written over P_k, the row radial sums into rad_row (m, n_dirs, n) and column radial sums into col_acc
// (m, width) of this thread.
template <typename T>
EMBEDLOSS_INLINE void rows_pass(const Params& p, const Direction<T>* dirs, int n_dirs, const double* weights,
                                 int64_t r0, int64_t n, int64_t begin, int64_t end, T* scratch, T* col_acc,
                                 T* rad_row, double* row_loss) {
  const T s = static_cast<T>(p.scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t Bq = p.bq, K = p.n_docs, m = p.m;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t g = r0 + i;
    double loss_i = 0.0;
    // the buffers hold the segment products R[:, seg_k] C[:, seg_k]^T: prefix sums make them P_k (this row, in cache)
    for (int d = 0; d < n_dirs; ++d) {
      const Direction<T>& dir = dirs[d];
      for (int64_t k = 1; k < m; ++k) {
        T* cur = dir.prods + k * p.block * dir.cols + i * dir.cols;
        const T* prev = cur - p.block * dir.cols;
#pragma omp simd
        for (int64_t j = 0; j < dir.cols; ++j) cur[j] += prev[j];
      }
    }
    for (int64_t k = m - 1; k >= 0; --k) {
      const T w = static_cast<T>(weights[k]);
      T maxes[4], sums[4], irn[4];
      T positive = 0, cos_pos = 0;
      for (int d = 0; d < n_dirs; ++d) {
        const Direction<T>& dir = dirs[d];
        const T* x = dir.prods + k * p.block * dir.cols + i * dir.cols;
        const T* ic = dir.inv_col + k * dir.cols;
        T* l = scratch + dir.offset;
        irn[d] = dir.inv_row[k * dir.stride_row + g];
        const bool boost_all = d == 0 && p.alpha > 0 &&
                               (p.hardness_mode == kHardnessInBatch || p.hardness_mode == kHardnessAll);
        const T f = (boost_all ? static_cast<T>(p.scale + p.alpha) : s) * irn[d];
#pragma omp simd
        for (int64_t j = 0; j < dir.cols; ++j) l[j] = x[j] * f * ic[j];
        if (d == 0) {
          cos_pos = x[g] * irn[d] * ic[g];
          positive = s * cos_pos;
          if (p.alpha > 0 && p.hardness_mode == kHardnessHard) {
            for (int64_t c = 1; c < K; ++c)
              l[g + c * Bq] += static_cast<T>(p.alpha) * x[g + c * Bq] * irn[d] * ic[g + c * Bq];
          } else if (boost_all && p.hardness_mode == kHardnessInBatch) {
            for (int64_t c = 0; c < K; ++c) l[g + c * Bq] = s * x[g + c * Bq] * irn[d] * ic[g + c * Bq];
          } else if (boost_all) {
            l[g] = positive;
          }
        }
        // masks: query_to_query drops the query itself, doc_to_doc the query's own docs
        if (dir.cols_are_q && dir.rows_are_q) l[g] = neg_inf;
        if (!dir.cols_are_q && !dir.rows_are_q)
          for (int64_t c = 0; c < K; ++c) l[g + c * Bq] = neg_inf;
        T mx = neg_inf;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < dir.cols; ++j) mx = simd_max(mx, l[j]);
        maxes[d] = mx;
      }
      if (p.joint) {
        T mx = maxes[0];
        for (int d = 1; d < n_dirs; ++d) mx = std::max(mx, maxes[d]);
        for (int d = 0; d < n_dirs; ++d) maxes[d] = mx;
      }
      for (int d = 0; d < n_dirs; ++d) sums[d] = exp_shift_sum(scratch + dirs[d].offset, dirs[d].cols, maxes[d]);
      double lse = 0.0;
      if (p.joint) {
        T total = 0;
        for (int d = 0; d < n_dirs; ++d) total += sums[d];
        for (int d = 0; d < n_dirs; ++d) sums[d] = total;
        lse = static_cast<double>(maxes[0]) + std::log(static_cast<double>(total));
      } else {
        for (int d = 0; d < n_dirs; ++d) lse += static_cast<double>(maxes[d]) + std::log(static_cast<double>(sums[d]));
        lse /= n_dirs;
      }
      loss_i += weights[k] * (lse - static_cast<double>(positive));
      if (!p.compute_grad) continue;

      // G = s w (softmax - onehot) / rows; radial sums of G cos; C_k = G / (|r||c|) + C_{k+1} over P_k
      const T inv_rows = static_cast<T>(p.inv_rows);
      for (int d = 0; d < n_dirs; ++d) {
        const Direction<T>& dir = dirs[d];
        T* x = dir.prods + k * p.block * dir.cols + i * dir.cols;
        const T* next = k + 1 < m ? dir.prods + (k + 1) * p.block * dir.cols + i * dir.cols : nullptr;
        const T* ic = dir.inv_col + k * dir.cols;
        const T* l = scratch + dir.offset;
        T* acc = col_acc + k * p.width + dir.offset;
        const T gw = s * w * inv_rows / static_cast<T>(p.joint ? 1 : n_dirs) / sums[d];
        const T r = irn[d];
        T row_rad = 0;
        if (next != nullptr) {
#pragma omp simd reduction(+ : row_rad)
          for (int64_t j = 0; j < dir.cols; ++j) {
            const T G = l[j] * gw;
            const T rc = r * ic[j];
            const T gc = G * x[j] * rc;
            row_rad += gc;
            acc[j] += gc;
            x[j] = G * rc + next[j];
          }
        } else {
#pragma omp simd reduction(+ : row_rad)
          for (int64_t j = 0; j < dir.cols; ++j) {
            const T G = l[j] * gw;
            const T rc = r * ic[j];
            const T gc = G * x[j] * rc;
            row_rad += gc;
            acc[j] += gc;
            x[j] = G * rc;
          }
        }
        if (d == 0) {  // the positive's one-hot: G[g] -= s w / rows
          const T delta = s * w * inv_rows;
          row_rad -= delta * cos_pos;
          acc[g] -= delta * cos_pos;
          x[g] -= delta * r * ic[g];
        }
        rad_row[(k * 4 + d) * p.block + i] = row_rad;
      }
    }
    row_loss[i] = loss_i;
  }
}

EMBEDLOSS_CLONES void rows_pass_isa(const Params& p, const Direction<float>* dirs, int n_dirs, const double* weights,
                                     int64_t r0, int64_t n, int64_t begin, int64_t end, float* scratch,
                                     float* col_acc, float* rad_row, double* row_loss) {
  rows_pass<float>(p, dirs, n_dirs, weights, r0, n, begin, end, scratch, col_acc, rad_row, row_loss);
}

EMBEDLOSS_CLONES void rows_pass_isa(const Params& p, const Direction<double>* dirs, int n_dirs,
                                     const double* weights, int64_t r0, int64_t n, int64_t begin, int64_t end,
                                     double* scratch, double* col_acc, double* rad_row, double* row_loss) {
  rows_pass<double>(p, dirs, n_dirs, weights, r0, n, begin, end, scratch, col_acc, rad_row, row_loss);
}

// (m, rows): max(||x[:, :d_k]||, eps) for every dim, from per-segment sums of squares.
at::Tensor prefix_norms(const at::Tensor& x, const std::vector<int64_t>& dims) {
  std::vector<at::Tensor> parts;
  int64_t lo = 0;
  for (int64_t d : dims) {
    parts.push_back(x.narrow(1, lo, d - lo).square().sum(1));
    lo = d;
  }
  return at::stack(parts).cumsum(0).sqrt_().clamp_min_(kEps);
}

// Rows per block: the m product buffers of every direction share the EMBEDLOSS_BLOCK_MIB budget (32 MiB by default),
// but a block never has fewer rows than our MNRL's (auto_block_rows), so that the products keep its shapes: the dA
// products have K = rows and rewrite dA[:, seg] once per block. Measured at B=4096, D=768, 5 dims (quiet 2-core
// EPYC, one process, interleaved): 256 rows ran at 1.22x our MNRL, 200 rows (the shared budget) at 1.28x, 104 rows
// at 1.40x; the peak memory did not move (backward, holding the saved gradients and their scaled copy, peaks as
// high as the forward pass).
int64_t matryoshka_block_rows(int64_t width, int64_t m, int64_t elem, int64_t row_count) {
  int64_t rows = static_cast<int64_t>(block_budget_mib() * (1 << 20)) / std::max<int64_t>(width * m * elem, 1);
  rows = rows >= 16 ? rows / 8 * 8 : std::max<int64_t>(rows, 1);
  rows = std::max(rows, auto_block_rows(width, elem, row_count));
  return std::max<int64_t>(1, std::min(rows, row_count));
}

template <typename T>
double matryoshka_blocks(const Params& p, const std::vector<int64_t>& dims, const std::vector<double>& weights,
                         int64_t row_start, int64_t rows_per_block, bool use_qq, bool use_dq, bool use_dd,
                         const at::Tensor& qf, const at::Tensor& af, const at::Tensor& inv_qn,
                         const at::Tensor& inv_an, at::Tensor& dq, at::Tensor& da, at::Tensor& rad_q,
                         at::Tensor& rad_a, at::Tensor& gcos) {
  const int64_t m = p.m, Bq = p.bq, Ka = af.size(0), R = rows_per_block;
  const auto opts = qf.options();
  struct Spec {
    bool rows_q, cols_q;
    int64_t cols;
  };
  std::vector<Spec> specs = {{true, false, Ka}};
  if (use_qq) specs.push_back({true, true, Bq});
  if (use_dq) specs.push_back({false, true, Bq});
  if (use_dd) specs.push_back({false, false, Ka});
  const int n_dirs = static_cast<int>(specs.size());
  std::vector<at::Tensor> prods;
  std::vector<int64_t> offsets;
  int64_t off = 0;
  for (const Spec& sp : specs) {
    prods.push_back(at::empty({m, R, sp.cols}, opts));
    offsets.push_back(off);
    off += sp.cols;
  }
  const int64_t threads = at::get_num_threads();
  at::Tensor col_acc = at::empty({threads, m, p.width}, opts);
  at::Tensor rad_row = at::empty({m, 4, R}, opts);
  std::vector<double> row_loss(R);
  double loss_sum = 0.0;
  std::vector<int64_t> lows(m);
  for (int64_t k = 0; k < m; ++k) lows[k] = k == 0 ? 0 : dims[k - 1];

  for (int64_t r0 = row_start; r0 < row_start + p.row_count; r0 += R) {
    const int64_t n = std::min(R, row_start + p.row_count - r0);
    const at::Tensor q_blk = qf.narrow(0, r0, n);
    const at::Tensor p_blk = af.narrow(0, r0, n);
    std::vector<Direction<T>> dirs;
    std::vector<at::Tensor> blocks;  // (m, n, cols) views
    for (int d = 0; d < n_dirs; ++d) {
      const Spec& sp = specs[d];
      const at::Tensor& rows = sp.rows_q ? q_blk : p_blk;
      const at::Tensor& cols = sp.cols_q ? qf : af;
      at::Tensor buf = prods[d].narrow(1, 0, n);  // (m, n, cols): buf[k] is contiguous
      // -- segment products, one pass over D (the row pass sums them into the prefix products P_k) --
      for (int64_t k = 0; k < m; ++k) {
        const int64_t lo = lows[k], w = dims[k] - lo;
        at::Tensor out = buf[k];
        at::mm_out(out, rows.narrow(1, lo, w), cols.narrow(1, lo, w).t());
      }
      blocks.push_back(buf);
      Direction<T> dir;
      dir.prods = buf.template data_ptr<T>();
      dir.cols = sp.cols;
      dir.inv_row = (sp.rows_q ? inv_qn : inv_an).template data_ptr<T>();
      dir.stride_row = sp.rows_q ? Bq : Ka;
      dir.inv_col = (sp.cols_q ? inv_qn : inv_an).template data_ptr<T>();
      dir.rows_are_q = sp.rows_q;
      dir.cols_are_q = sp.cols_q;
      dir.offset = offsets[d];
      dirs.push_back(dir);
    }

    if (p.compute_grad) col_acc.zero_();
    T* col_acc_p = col_acc.template data_ptr<T>();
    T* rad_row_p = rad_row.template data_ptr<T>();
    at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(p.width);
      const int64_t tid = at::get_thread_num();
      rows_pass_isa(p, dirs.data(), n_dirs, weights.data(), r0, n, begin, end, scratch.data(),
                    col_acc_p + tid * m * p.width, rad_row_p, row_loss.data());
    });
    for (int64_t i = 0; i < n; ++i) loss_sum += row_loss[i];
    if (!p.compute_grad) continue;

    // -- radial sums: rows of this block, columns summed over threads in thread order --
    at::Tensor col_sum = col_acc.sum(0);  // (m, width)
    gcos.add_(rad_row.narrow(1, 0, n_dirs).narrow(2, 0, n).sum());  // sum of G cos over the block: s dL/ds
    for (int d = 0; d < n_dirs; ++d) {
      const Spec& sp = specs[d];
      at::Tensor rr = rad_row.select(1, d).narrow(1, 0, n);  // (m, n)
      const at::Tensor& inv_r = sp.rows_q ? inv_qn : inv_an;
      (sp.rows_q ? rad_q : rad_a).narrow(1, r0, n).add_(rr * inv_r.narrow(1, r0, n).square());
      const at::Tensor& inv_c = sp.cols_q ? inv_qn : inv_an;
      (sp.cols_q ? rad_q : rad_a).add_(col_sum.narrow(1, offsets[d], sp.cols) * inv_c.square());
    }
    // -- gradient products per segment, with C_k over P_k --
    for (int64_t k = m - 1; k >= 0; --k) {
      const int64_t lo = lows[k], w = dims[k] - lo;
      for (int d = 0; d < n_dirs; ++d) {
        const Spec& sp = specs[d];
        const at::Tensor& rows = sp.rows_q ? q_blk : p_blk;
        const at::Tensor& cols = sp.cols_q ? qf : af;
        at::Tensor c_k = blocks[d][k];
        at::Tensor d_rows = (sp.rows_q ? dq : da).narrow(0, r0, n).narrow(1, lo, w);
        at::Tensor d_cols = (sp.cols_q ? dq : da).narrow(1, lo, w);
        d_rows.addmm_(c_k, cols.narrow(1, lo, w));
        d_cols.addmm_(c_k.t(), rows.narrow(1, lo, w));
      }
    }
  }
  return loss_sum;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> matryoshka_cpu(
    const at::Tensor& q, const at::Tensor& a, at::IntArrayRef dims_ref, at::ArrayRef<double> weights_ref,
    int64_t row_start, int64_t row_count, double scale, int64_t directions, bool joint, int64_t hardness_mode,
    double hardness_strength, bool compute_grad, int64_t block_rows) {
  TORCH_CHECK(q.dim() == 2 && a.dim() == 2 && q.size(1) == a.size(1) && a.size(0) % std::max<int64_t>(q.size(0), 1) == 0,
              "matryoshka: q (Bq, D) and a (K*Bq, D) expected");
  TORCH_CHECK(dims_ref.size() == weights_ref.size() && !dims_ref.empty(), "matryoshka: one weight per dim expected");
  std::vector<int64_t> dims(dims_ref.begin(), dims_ref.end());
  std::vector<double> weights(weights_ref.begin(), weights_ref.end());
  for (size_t k = 0; k < dims.size(); ++k)
    TORCH_CHECK(dims[k] >= 1 && dims[k] <= q.size(1) && (k == 0 || dims[k] > dims[k - 1]),
                "matryoshka: dims must be strictly increasing in [1, D]");
  const auto out_dtype = q.scalar_type();
  const auto wd = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor qf = q.to(wd).contiguous(), af = a.to(wd).contiguous();
  const int64_t m = static_cast<int64_t>(dims.size()), Bq = q.size(0), Ka = a.size(0);
  const bool use_qq = directions & kQueryToQuery, use_dq = directions & kDocToQuery, use_dd = directions & kDocToDoc;
  const at::Tensor qn = prefix_norms(qf, dims), an = prefix_norms(af, dims);
  const at::Tensor inv_qn = qn.reciprocal(), inv_an = an.reciprocal();

  Params p;
  p.m = m;
  p.bq = Bq;
  p.n_docs = Ka / Bq;
  p.row_count = row_count;
  p.width = Ka * (1 + use_dd) + Bq * (use_qq + use_dq);
  p.hardness_mode = hardness_mode;
  p.scale = scale;
  p.alpha = hardness_mode != kHardnessNone ? hardness_strength : 0.0;
  p.inv_rows = 1.0 / static_cast<double>(row_count);
  p.joint = joint;
  p.compute_grad = compute_grad;
  const int64_t elem = wd == at::kDouble ? 8 : 4;
  const int64_t R = block_rows > 0 ? std::min(block_rows, row_count)
                                   : matryoshka_block_rows(p.width, m, elem, row_count);

  p.block = R;
  at::Tensor dq = compute_grad ? at::zeros_like(qf) : at::Tensor();
  at::Tensor da = compute_grad ? at::zeros_like(af) : at::Tensor();
  at::Tensor rad_q = compute_grad ? at::zeros({m, Bq}, qf.options()) : at::Tensor();
  at::Tensor rad_a = compute_grad ? at::zeros({m, Ka}, qf.options()) : at::Tensor();
  at::Tensor gcos = at::zeros({}, qf.options());
  double loss_sum;
  if (wd == at::kDouble)
    loss_sum = matryoshka_blocks<double>(p, dims, weights, row_start, R, use_qq, use_dq, use_dd, qf, af, inv_qn,
                                         inv_an, dq, da, rad_q, rad_a, gcos);
  else
    loss_sum = matryoshka_blocks<float>(p, dims, weights, row_start, R, use_qq, use_dq, use_dd, qf, af, inv_qn,
                                        inv_an, dq, da, rad_q, rad_a, gcos);
  at::Tensor loss = at::scalar_tensor(loss_sum / static_cast<double>(row_count), qf.options());
  if (!compute_grad) return {loss, q.new_empty({0}), q.new_empty({0}), loss.new_empty({0})};
  // radial terms: segment k takes rho_k = sum_{j >= k} rad_j; rows whose prefix norm was clamped take none
  const at::Tensor xs[2] = {qf, af};
  at::Tensor grads[2] = {dq, da};
  at::Tensor rads[2] = {rad_q, rad_a};
  const at::Tensor norms[2] = {qn, an};
  for (int t = 0; t < 2; ++t) {
    at::Tensor rho = rads[t].masked_fill(norms[t] <= kEps, 0.0).flip({0}).cumsum(0).flip({0});
    for (int64_t k = 0; k < m; ++k) {
      const int64_t lo = k == 0 ? 0 : dims[k - 1], w = dims[k] - lo;
      grads[t].narrow(1, lo, w).addcmul_(xs[t].narrow(1, lo, w), rho[k].unsqueeze(1), -1.0);
    }
  }
  // every logit is s cos_k (+ a stop-gradient penalty), and G_k = d loss / d cos_k carries the factor s:
  // d loss / d s = sum(G cos) / s (not finite at s = 0: the functional layer sends a learnable 0 to the reference)
  at::Tensor grad_scale = gcos / scale;
  return {loss, dq.to(out_dtype), da.to(out_dtype), grad_scale};
}

}  // namespace
}  // namespace embedloss

// The CPU kernel of embedloss_cpp::matryoshka. The schema (embedloss_kernels/core/contract.py), the fake
// implementation and the autograd are registered from Python (embedloss_kernels/ops).
TORCH_LIBRARY_IMPL(embedloss_cpp, CPU, m) { m.impl("matryoshka", &embedloss::matryoshka_cpu); }
