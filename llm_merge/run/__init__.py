"""Execution: one tensor task through its method (``engine``), worker processes (``pool``), ranks that share one
merge through the filesystem (``ranks``, ``heartbeat``)."""
