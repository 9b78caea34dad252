"""Compiled (numba) code that method specs name. ``fused`` is where the backend finds every piece: the fused
apply pass, and re-exported, the drop-in twins of the NumPy methods (``twins``) and the streamed statistics
(``streaming``, ``streamed_ranks``; mergekit's: ``mergekit_streaming``, ``row_ranks``). Each method's compiled
math is written once, in ``method_blocks`` (mergekit's sparsifiers in ``mergekit_blocks``); ``blocks`` widens
and narrows raw bits; ``ranks`` gives DELLA's magnitude midranks from rank tables; ``cache`` keeps numba's
on-disk cache correct; ``counter_rng`` holds the counter-based draws every backend shares (``draws``: in
compiled code), ``l1_sums`` the exact L1 sums of mergekit's rescale, ``counts`` the counts both sides agree on."""
