"""``gather_across_devices`` over torch.distributed: this rank's rows against every rank's columns.

Two schedules compute the same loss and gradients, below the functional API (which calls them with its local step):

* ``gather`` (:mod:`.gather`, the default): each rank all-gathers its columns straight into the op's layout and runs
  the fused op on its own anchor rows against every gathered column; backward reduce-scatters the column gradients
  to their owners. MNRL, Matryoshka and GIST all use it.
* ``ring`` (:mod:`.ring`): no rank ever holds the world's columns; column blocks travel round the ring while the
  current one is computed on (MNRL with cosine or dot similarity).

The drop-in losses read ``EMBEDLOSS_DISTRIBUTED_SCHEDULE`` (``gather`` by default, or ``ring``); every rank must use
the same schedule (checked with the shapes in :func:`.collectives.gather_metadata`, so a mismatch raises on every
rank). Ranks may hold different local batch sizes.
"""
