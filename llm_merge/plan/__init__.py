"""From checkpoint headers to a checked, laid-out plan (``build``): reconciled names and vocabularies
(``reconcile``), slices (``slices``), per-tensor parameters (``gradients``), shard layout (``layout``).
No tensor data is read here."""
