"""Hugging Face checkpoint to GGUF in one streaming pass, with llama.cpp's own kernels. This package never
imports the runtime (localmix/)."""

from importlib.metadata import PackageNotFoundError, version

try:  # one distribution (localmix), one version, read from its metadata
    __version__ = version("localmix")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
