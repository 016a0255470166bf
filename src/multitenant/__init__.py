"""multitenant: co-location experiments on one NVIDIA GPU (CUDA MPS shares or time-slicing)."""

__version__ = "0.1.0"
