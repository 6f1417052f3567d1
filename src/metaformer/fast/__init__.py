"""Fast paths: a fused inference model (:func:`fuse`) and a memory-saving training path."""
from .fuse import FusedConv, FusedHead, FusedPoolBlock, compile_fused, fuse, set_backend

__all__ = ["FusedConv", "FusedHead", "FusedPoolBlock", "compile_fused", "fuse", "set_backend"]
