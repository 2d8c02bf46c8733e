"""The package version: written into latent files, export manifests and the APIs."""

__version__ = "0.1.0"
