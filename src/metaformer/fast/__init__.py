"""Fast paths: a fused inference model (:func:`fuse`) and a memory-saving training path."""
from .alloc import keep_freed_memory
from .fuse import (FusedConv, FusedHead, FusedPoolBlock, FusionError, FusionReport, compile_fused, cpu_capabilities,
                   fuse, fusion_report, set_backend, set_gemm)

__all__ = ["keep_freed_memory", "FusedConv", "FusedHead", "FusedPoolBlock", "FusionError", "FusionReport",
           "compile_fused", "cpu_capabilities", "fuse", "fusion_report", "set_backend", "set_gemm"]
