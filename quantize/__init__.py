"""Hugging Face checkpoint to GGUF in one streaming pass, with llama.cpp's own kernels."""

from localmix import __version__  # one distribution, one version

__all__ = ["__version__"]
