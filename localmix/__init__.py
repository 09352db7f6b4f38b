"""localmix: run Mixtral-class Mixture-of-Experts models on one desktop (GPU + RAM + CPU)."""

__version__ = "0.1.0"
