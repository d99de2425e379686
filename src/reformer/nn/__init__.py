"""The modules: attention layers, feed-forward and embeddings, the reversible stack and ReformerLM."""
