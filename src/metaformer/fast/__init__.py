"""Fast paths: a fused inference model (:func:`fuse`) and a memory-saving training path."""
from .alloc import keep_freed_memory
from .fuse import FusedConv, FusedHead, FusedPoolBlock, compile_fused, fuse, set_backend

__all__ = ["keep_freed_memory", "FusedConv", "FusedHead", "FusedPoolBlock", "compile_fused", "fuse", "set_backend"]
