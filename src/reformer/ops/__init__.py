"""Tensor functions and kernels, no ``nn.Module``: what the attention layers are built from."""
