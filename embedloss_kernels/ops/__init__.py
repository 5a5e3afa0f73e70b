"""The op contract every backend implements (maths: ``docs/DESIGN.md``; oracle: ``embedloss_kernels.reference``).

InfoNCE / MNRL op (one per backend: ``embedloss_torch::infonce``, ``embedloss_cpp::infonce``,
``embedloss_triton::infonce``), schema::

    infonce(Tensor q, Tensor a, int row_start, int row_count, float scale, bool cosine, int directions,
            bool joint, int hardness_mode, float hardness_strength, bool compute_grad, int block_rows)
        -> (Tensor loss, Tensor grad_q, Tensor grad_a)

* ``q`` (Bq, D): every query (the world batch under ``gather_across_devices``); ``a`` (K*Bq, D): the candidate
  pool ``[P; N_1; ...; N_{K-1}]``, so the docs of query ``g`` are rows ``g + c*Bq``. Same dtype and device,
  contiguous, validated before the op is called.
* Local anchor rows are ``row_start .. row_start + row_count - 1`` (global indices ``g``).
* ``directions``: bit mask of :data:`QUERY_TO_DOC` | :data:`QUERY_TO_QUERY` | :data:`DOC_TO_QUERY` |
  :data:`DOC_TO_DOC` (query_to_doc always set). ``joint``: one softmax over all selected blocks, else one per
  block averaged (only query_to_doc and doc_to_query then).
* ``hardness_mode``: :data:`HARDNESS_NONE` | :data:`HARDNESS_IN_BATCH` | :data:`HARDNESS_HARD` |
  :data:`HARDNESS_ALL`; adds ``hardness_strength * sg(sim)`` to the selected query_to_doc logits.
* ``loss``: 0-dim, the mean over local rows; float32 (float64 for float64 inputs).
* ``grad_q``, ``grad_a``: d loss / d q and d loss / d a (shapes and dtypes of ``q`` and ``a``) when
  ``compute_grad``; else empty tensors of shape (0,). Backward multiplies them by ``grad_output``.
* ``block_rows``: anchor rows per block; 0 lets the backend choose (a hint a backend may ignore).

CoSENT / AnglE op, schema::

    cosent(Tensor x, Tensor y, Tensor labels, float scale, int similarity, bool compute_grad)
        -> (Tensor loss, Tensor grad_x, Tensor grad_y)

* ``x``, ``y`` (B, D), ``labels`` (B,) float64; ``similarity``: :data:`SIM_COSINE` | :data:`SIM_DOT` |
  :data:`SIM_ANGLE` (``|cos + sin|`` of AnglE, dims ``i`` and ``i + ceil(D/2)`` paired, odd D zero-padded).
* ``loss = log(1 + sum_{y_i > y_j} exp(t_j - t_i))`` with ``t = scale * sim(x, y)``; float32 (float64 for
  float64 inputs). Gradients as for infonce.

Matryoshka MNRL op (``embedloss_torch_matryoshka::matryoshka``, ``embedloss_cpp::matryoshka``,
``embedloss_triton_matryoshka::matryoshka``; maths in ``embedloss_kernels/ops/torch_matryoshka.py``), schema::

    matryoshka(Tensor q, Tensor a, int[] dims, float[] weights, int row_start, int row_count, float scale,
               int directions, bool joint, int hardness_mode, float hardness_strength, bool compute_grad,
               int block_rows) -> (Tensor loss, Tensor grad_q, Tensor grad_a)

* ``q``, ``a``, rows, ``directions``, ``joint``, hardness, ``compute_grad``, ``block_rows``: as ``infonce``, on the
  full-dimension (unnormalized) embeddings.
* ``dims``: the prefix dims, strictly increasing, ``1 <= d <= D``; ``weights``: one finite float per dim.
* ``loss = sum_k weights[k] * infonce(normalize(q[:, :dims[k]]), normalize(a[:, :dims[k]]), cosine)``: every
  prefix is L2-normalized (sentence-transformers' ``MatryoshkaLoss`` ``shrink``), so the similarity is always the
  cosine of the prefixes. Loss and gradients (w.r.t. the raw ``q``, ``a``) as for infonce.

Cosine similarity normalizes with ``x / max(||x||, EPS)`` (``EPS`` = 1e-12, as ``F.normalize``).
"""

QUERY_TO_DOC = 1
QUERY_TO_QUERY = 2
DOC_TO_QUERY = 4
DOC_TO_DOC = 8
DIRECTION_BITS = {
    "query_to_doc": QUERY_TO_DOC,
    "query_to_query": QUERY_TO_QUERY,
    "doc_to_query": DOC_TO_QUERY,
    "doc_to_doc": DOC_TO_DOC,
}

HARDNESS_NONE = 0
HARDNESS_IN_BATCH = 1
HARDNESS_HARD = 2
HARDNESS_ALL = 3
HARDNESS_CODES = {
    None: HARDNESS_NONE,
    "in_batch_negatives": HARDNESS_IN_BATCH,
    "hard_negatives": HARDNESS_HARD,
    "all_negatives": HARDNESS_ALL,
}

SIM_COSINE = 0
SIM_DOT = 1
SIM_ANGLE = 2

EPS = 1e-12

INFONCE_SCHEMA = (
    "(Tensor q, Tensor a, int row_start, int row_count, float scale, bool cosine, int directions, bool joint, "
    "int hardness_mode, float hardness_strength, bool compute_grad, int block_rows) "
    "-> (Tensor, Tensor, Tensor)"
)
COSENT_SCHEMA = (
    "(Tensor x, Tensor y, Tensor labels, float scale, int similarity, bool compute_grad) -> (Tensor, Tensor, Tensor)"
)
MATRYOSHKA_SCHEMA = (
    "(Tensor q, Tensor a, int[] dims, float[] weights, int row_start, int row_count, float scale, int directions, "
    "bool joint, int hardness_mode, float hardness_strength, bool compute_grad, int block_rows) "
    "-> (Tensor, Tensor, Tensor)"
)
