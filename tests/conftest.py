import os

# DeepSpeed picks its accelerator at import: on these CPU-only machines it must be the CPU one.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
