"""envbuild: card-targeted container images for old GPU model stacks."""

__version__ = "0.1.0"
