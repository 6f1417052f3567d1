"""The one benchmark harness: our modes against timm (same weights), ONNX Runtime and OpenVINO, side by side.

Every mode of one configuration (variant, batch, resolution, dtype) is built in the same
process, warmed up, then timed *interleaved*: each repeat runs every mode once, in a rotated
order, so background load and thermal drift hit all modes alike. We report the median, min
and max over repeats, plus each mode's max abs logit difference from our plain fp32 model
(timm modes: from timm's own eager fp32 model, since timm's heads legitimately differ from the
authors': PoolFormer v1 normalises after pooling, ConvFormer/CAFormer's MLP head uses LayerNorm
eps 1e-6 where the authors use 1e-5).

Peak training memory is RSS growth on CPU, measured in a fresh subprocess per mode (RSS is a
process-wide high-water mark, so modes sharing a process would hide each other's peaks),
and ``torch.cuda.max_memory_allocated`` on CUDA. Times come from a :class:`Timer`: the host clock
on CPU, CUDA events on a GPU (``benchmarks/gpu_check.py`` runs this harness on one).

By concern: :mod:`.timing` (the timers and the interleaved loop; :func:`median_time` times one
function for scripts of their own), :mod:`.modes` (how each mode is built), :mod:`.memory` (the
peak-memory probes), :mod:`.environment` (the machine), :mod:`.report` (results as a table and as
JSON) and :mod:`.harness` (:func:`bench_inference`, :func:`bench_training`).

Used by ``metaformer bench`` and by the scripts in ``benchmarks/``.
"""
from .environment import environment
from .harness import bench_inference, bench_training
from .memory import MALLOC_ENV, inference_peak_memory, reexec_with_fixed_mmap_threshold, train_memory
from .modes import (DEFAULT_INFER, DEFAULT_TRAIN, DTYPES, INFER_MODES, TRAIN_MODES, build_infer_mode,
                    build_train_mode, compile_options, cuda_graph, gflop_per_image, model_of_file, ort_file,
                    randomize_affine, timm_reference)
from .report import Result, markdown_table, save_json
from .timing import EventTimer, Timer, interleaved_timing, make_timer, median_time, synchronize


__all__ = ["DEFAULT_INFER", "DEFAULT_TRAIN", "DTYPES", "INFER_MODES", "MALLOC_ENV", "TRAIN_MODES", "EventTimer",
           "Result", "Timer", "bench_inference", "bench_training", "build_infer_mode", "build_train_mode",
           "compile_options", "cuda_graph", "environment", "gflop_per_image", "inference_peak_memory",
           "interleaved_timing", "make_timer", "markdown_table", "median_time", "model_of_file", "ort_file",
           "randomize_affine", "reexec_with_fixed_mmap_threshold", "save_json", "synchronize", "timm_reference",
           "train_memory"]
