"""The compiled interval core: its C source, the loader that builds it, and the calls into it."""
