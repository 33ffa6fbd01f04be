"""ms_cxr: multi-scale, multi-label chest X-ray classification in JAX/Flax."""

__version__ = '0.1.0'
