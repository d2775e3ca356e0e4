"""The whole workflow at a tiny size: its steps, each skipped once done (``steps``), on
segmentation (``segmentation``) and on classification (``classification``)."""
