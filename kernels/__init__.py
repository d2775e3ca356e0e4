"""The fused top-k softmax-KL kernels (issue 4)."""
