"""OpenMMLab's mmcv-full 1.x and mmcv 2.x: CUDA ops compiled against torch (MMCV_WITH_OPS)."""

from __future__ import annotations

from .base import CatalogCompiled


class Mmcv(CatalogCompiled):
    family = "mmcv"
    names = ("mmcv-full", "mmcv")
    build_env = {"MMCV_WITH_OPS": "1"}  # without it the sdist builds mmcv-lite: no ops
    op_check = "mmcv"

    def owns(self, cat, name):
        return name in self.names

    def import_name(self, name):
        return "mmcv"
