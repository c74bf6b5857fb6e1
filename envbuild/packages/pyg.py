"""PyG's compiled companions (torch-scatter, torch-sparse, torch-cluster): C++/CUDA ops against torch."""

from __future__ import annotations

from .base import CatalogCompiled


class PygOps(CatalogCompiled):
    family = "pyg"
    names = ("torch-scatter", "torch-sparse", "torch-cluster")

    def owns(self, cat, name):
        return name in self.names

    def op_check_for(self, name):  # each package has a check of its own, named like its import
        return self.import_name(name)
