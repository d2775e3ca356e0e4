"""The foundations every other part uses: user errors (``errors``), progress bars (``progress``),
torchrun process groups (``distributed``), where kdcache may write (``outputs``), options declared
on config fields (``options``), name → factory registries (``registry``), the run folder (``runs``),
the checkpoint format (``checkpoint``), the confusion matrix (``metrics``) and the arithmetic of a
top-k + tail target (``topk``)."""
