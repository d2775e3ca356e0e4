"""kdcache: offline teacher caches for cheap knowledge distillation in semantic segmentation."""

__version__ = "0.1.0"
