"""The teacher: the pass that writes a cache (``cache_build``), ensembles and test-time
augmentation combined per pixel (``ensemble``) and the live teacher of parity checks (``online``)."""
