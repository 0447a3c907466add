"""Model families, one file each. Every model takes flat token tensors and a paged KV cache."""
