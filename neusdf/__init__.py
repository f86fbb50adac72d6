"""neusdf: fast neural signed distance fields on a compiled anisotropic kNN feature op."""

__version__ = "0.1.0"
