"""Building blocks of the handwritten models: norms, rotary embeddings, paged attention."""
