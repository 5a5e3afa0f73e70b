"""The op contract every backend implements (maths: ``docs/DESIGN.md``; oracle: ``embedloss_kernels.reference``).

One op per loss, the same schema on every backend: ``embedloss_<backend>::<loss>`` with ``<backend>`` one of
:data:`BACKENDS` and ``<loss>`` one of :data:`LOSSES` (``torch.ops.embedloss_cpp.infonce``,
``torch.ops.embedloss_triton.gist``...). :mod:`embedloss_kernels.ops` defines them from :data:`SCHEMAS` and registers
their fakes and the one autograd rule; :mod:`embedloss_kernels.dispatch` picks the backend.

InfoNCE / MNRL op ``infonce``, schema::

    infonce(Tensor q, Tensor a, int row_start, int row_count, float scale, bool cosine, int directions,
            bool joint, int hardness_mode, float hardness_strength, bool compute_grad, int block_rows)
        -> (Tensor loss, Tensor grad_q, Tensor grad_a, Tensor grad_scale)

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
* ``grad_scale``: d loss / d scale, 0-dim in the loss's dtype, when ``compute_grad`` (else empty (0,)): the sum of
  ``G * sim`` over every logit (the hardness penalty is stop-gradient, so it adds nothing). It costs one reduction:
  each logit ``s * sim(x, y)`` sends ``s * G * sim`` to both of its vectors, so ``sum <v, dv>`` over the vectors that
  enter the products (normalized under cosine, before the normalization's backward) is ``2 s dL/ds``.
  The identity divides by ``scale``: at ``scale == 0`` the value is not finite, so the functional layer runs a
  learnable scale of 0 through the plain reference instead (MNRL's modules and functional API want scale > 0).
* ``block_rows``: anchor rows per block; 0 lets the backend choose (a hint a backend may ignore).

CoSENT / AnglE op ``cosent``, schema::

    cosent(Tensor x, Tensor y, Tensor labels, float scale, int similarity, bool compute_grad)
        -> (Tensor loss, Tensor grad_x, Tensor grad_y, Tensor grad_scale)

* ``x``, ``y`` (B, D), ``labels`` (B,) float64; ``similarity``: :data:`SIM_COSINE` | :data:`SIM_DOT` |
  :data:`SIM_ANGLE` (``|cos + sin|`` of AnglE, dims ``i`` and ``i + ceil(D/2)`` paired, odd D zero-padded).
* ``loss = log(1 + sum_{y_i > y_j} exp(t_j - t_i))`` with ``t = scale * sim(x, y)``; float32 (float64 for
  float64 inputs). Gradients as for infonce; ``grad_scale = sum_k d loss / d t_k * sim_k`` directly, so any real
  ``scale`` (0 and negative values too) is allowed.

Matryoshka MNRL op ``matryoshka`` (maths in ``embedloss_kernels/backends/torch/matryoshka.py``), schema::

    matryoshka(Tensor q, Tensor a, int[] dims, float[] weights, int row_start, int row_count, float scale,
               int directions, bool joint, int hardness_mode, float hardness_strength, bool compute_grad,
               int block_rows) -> (Tensor loss, Tensor grad_q, Tensor grad_a, Tensor grad_scale)

* ``q``, ``a``, rows, ``directions``, ``joint``, hardness, ``compute_grad``, ``block_rows``: as ``infonce``, on the
  full-dimension (unnormalized) embeddings.
* ``dims``: the prefix dims, strictly increasing, ``1 <= d <= D``; ``weights``: one finite float per dim.
* ``loss = sum_k weights[k] * infonce(normalize(q[:, :dims[k]]), normalize(a[:, :dims[k]]), cosine)``: every
  prefix is L2-normalized (sentence-transformers' ``MatryoshkaLoss`` ``shrink``), so the similarity is always the
  cosine of the prefixes. Loss and gradients (w.r.t. the raw ``q``, ``a``) as for infonce.
* ``grad_scale``: d loss / d scale, 0-dim in the loss's dtype, when ``compute_grad`` (else empty (0,)): with
  ``S_k = scale * cos_k`` (plus the stop-gradient hardness penalty, which adds nothing), the sum over every dim and
  logit of ``d loss / d S_k * cos_k``. The row pass already sums ``G_k * cos_k`` (``G_k = d loss / d cos_k``, which
  carries the factor ``scale``) for the normalization's radial terms; their total over ``scale`` is the gradient.
  As for infonce it divides by ``scale``: at ``scale == 0`` it is not finite, and the functional layer runs a
  learnable scale of 0 through the plain reference instead.

GIST (guided in-batch negatives, sentence-transformers' ``GISTEmbedLoss``) op ``gist``, schema::

    gist(Tensor anchor, Tensor candidates, Tensor anchor_guide, Tensor candidates_guide, int columns,
         int row_start, float scale, int margin_strategy, float margin, bool contrast_anchors,
         bool contrast_positives, bool compute_grad, int block_rows) -> (Tensor loss, Tensor grad_anchor,
         Tensor grad_candidates)

* ``anchor`` (B, D): this rank's anchors (never gathered); ``candidates`` (columns*Bw, D): the pool
  ``[P; N_1; ...]`` of the (world) batch, Bw rows per column; anchor ``i``'s positive is candidate row
  ``row_start + i``. ``anchor_guide`` (B, D') and ``candidates_guide`` (columns*Bw, D'): the guide model's
  embeddings of the same rows (their own dtype and dim D'; same device). All contiguous, validated before the op.
* Every similarity is cosine as ``nn.CosineSimilarity(dim=-1)`` computes it: ``x / max(||x||, GIST_EPS)``
  (``GIST_EPS`` = 1e-8; the clamp is a constant for autograd, so the gradient of a row with ``0 < ||x|| < eps``
  keeps its radial term scaled by ``max(||x||, eps) / ||x||``, and a zero row gets ``g / eps``).
* Row threshold ``t_i = cos(a'_i, p'_{row_start+i})``; a candidate ``j`` of a block is masked (logit -inf) where
  its guide similarity ``> t_i - margin`` (:data:`GIST_ABSOLUTE`) or ``> t_i - |t_i| * margin``
  (:data:`GIST_RELATIVE`), strictly; the guide similarities and ``t`` are computed in the guide's work dtype.
  As in sentence-transformers (``t`` an entry of its guide matrix), a candidate whose guide rows equal the row's
  anchor and positive (a repeated text) ties with ``t`` exactly and is kept at margin 0, in every block.
  The anchor's own positive is never masked; nothing else is exempt (the anchor-anchor diagonal follows the rule).
* Blocks of row ``i``: anchor-positive ``cos(a_i, P)`` (Bw), anchor-anchor ``cos(a_i, A)`` (B, local anchors) if
  ``contrast_anchors``, positive-positive ``cos(p_{row_start+i}, P)`` (Bw) if ``contrast_positives``,
  anchor-negative ``cos(a_i, N_k)`` (Bw each). One softmax over all of them times ``scale`` (= 1/temperature),
  target the positive; ``loss`` = the mean over the B rows, float32 (float64 for float64 inputs). A row whose every
  candidate but its positive is masked contributes 0.
* ``grad_anchor``, ``grad_candidates``: d loss / d anchor and d loss / d candidates (shapes and dtypes of the
  inputs) when ``compute_grad``, else empty (0,) tensors. The guide gets no gradient. No tensor of size B x N is
  kept: one row block at a time, the guide's products are one extra product per block, forward only.

SigLIP (sigmoid pairwise loss, OpenCLIP's ``SigLipLoss``) op ``siglip``, schema::

    siglip(Tensor x, Tensor y, Tensor scale, Tensor bias, int positive_offset, bool has_positives,
           bool compute_grad, int block_rows) -> (Tensor loss, Tensor grad_x, Tensor grad_y, Tensor grad_scale,
           Tensor grad_bias)

* ``x`` (B, D) this rank's rows (images), ``y`` (N, D) a block of columns (texts), same dtype and device,
  contiguous; ``scale``, ``bias``: 0-dim tensors in the work dtype (float64 for float64 inputs, else float32), on
  the device of ``x`` (read on the device: no host sync). ``scale`` is the multiplier itself (OpenCLIP passes
  ``logit_scale.exp()``), any finite real.
* ``z_ij = scale * <x_i, y_j> + bias`` (dot product of the rows as given: no normalization). Row ``i``'s positive
  is column ``positive_offset + i`` when ``has_positives`` (``positive_offset + B <= N``); with ``has_positives``
  false every pair is a negative (another rank's block of texts).
* ``loss = (1/B) sum_ij softplus(-t_ij z_ij)``, ``t_ij = +1`` for the positive, ``-1`` otherwise (OpenCLIP's
  ``-logsigmoid(labels * logits).sum() / B``), computed stably (``max(u, 0) + log1p(exp(-|u|))``: no overflow at any
  finite ``z``); 0-dim, float32 (float64 for float64 inputs).
* With ``G_ij = sigmoid(z_ij) - P_ij``: ``grad_x = (scale/B) G Y``, ``grad_y = (scale/B) G^T X`` (shapes and dtypes
  of ``x`` and ``y``), ``grad_scale = (1/B) sum_ij G_ij <x_i, y_j> = (1/B) sum_i <x_i, (G Y)_i>`` (no division by the
  scale: any scale, 0 included), ``grad_bias = (1/B) sum_ij G_ij``, both 0-dim in the loss's dtype; every gradient is
  an empty (0,) tensor without ``compute_grad``. Backward gives ``scale`` and ``bias`` (the third and fourth
  inputs) ``grad_output * grad_scale`` and ``grad_output * grad_bias``.
* ``block_rows``: rows per block; 0 lets the backend choose (a hint). One pass over row blocks: ``S = X_b Y^T``,
  the elementwise pass (loss and ``G``), ``G Y`` and ``G^T X_b``: three matmul-equivalents, no B x N tensor kept.

Cosine similarity (infonce, cosent, matryoshka) normalizes with ``x / max(||x||, EPS)`` (``EPS`` = 1e-12, as
``F.normalize``).
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

GIST_ABSOLUTE = 0
GIST_RELATIVE = 1
GIST_MARGIN_STRATEGIES = {"absolute": GIST_ABSOLUTE, "relative": GIST_RELATIVE}
GIST_EPS = 1e-8  # nn.CosineSimilarity's eps

INFONCE_SCHEMA = (
    "(Tensor q, Tensor a, int row_start, int row_count, float scale, bool cosine, int directions, bool joint, "
    "int hardness_mode, float hardness_strength, bool compute_grad, int block_rows) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
COSENT_SCHEMA = (
    "(Tensor x, Tensor y, Tensor labels, float scale, int similarity, bool compute_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
MATRYOSHKA_SCHEMA = (
    "(Tensor q, Tensor a, int[] dims, float[] weights, int row_start, int row_count, float scale, int directions, "
    "bool joint, int hardness_mode, float hardness_strength, bool compute_grad, int block_rows) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
GIST_SCHEMA = (
    "(Tensor anchor, Tensor candidates, Tensor anchor_guide, Tensor candidates_guide, int columns, int row_start, "
    "float scale, int margin_strategy, float margin, bool contrast_anchors, bool contrast_positives, "
    "bool compute_grad, int block_rows) -> (Tensor, Tensor, Tensor)"
)

SIGLIP_SCHEMA = (
    "(Tensor x, Tensor y, Tensor scale, Tensor bias, int positive_offset, bool has_positives, bool compute_grad, "
    "int block_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

LOSSES = ("infonce", "cosent", "matryoshka", "gist", "siglip")
BACKENDS = ("torch", "cpp", "triton")
SCHEMAS = {"infonce": INFONCE_SCHEMA, "cosent": COSENT_SCHEMA, "matryoshka": MATRYOSHKA_SCHEMA, "gist": GIST_SCHEMA,
           "siglip": SIGLIP_SCHEMA}
