"""localmix: run Mixtral-class Mixture-of-Experts models on one desktop (GPU + RAM + CPU)."""

from quantize import __version__

__all__ = ["__version__"]
