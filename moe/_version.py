"""The release of moe-a2a (read by the build backend and by ``moe_a2a.__version__``)."""

__version__ = "0.2.0"
