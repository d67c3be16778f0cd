"""Model code (Llama family, written for a paged KV cache) and loaders."""
