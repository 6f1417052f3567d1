"""Weights I/O: files and the download cache (``io``), checkpoint layouts and their conversion
(``layouts``), strict loading (``load``) and self-describing saving (``save``). Depends only on
``metaformer.models``."""
from .io import EXTENSIONS, WeightsError, cache_dir, download, file_sha256, read_state_dict
from .layouts import LAYOUTS, detect_layout, from_ours, to_ours
from .load import LoadReport, architecture, check_finite, load_weights
from .save import jsonable_config, read_metadata, save_weights

__all__ = ["EXTENSIONS", "LAYOUTS", "LoadReport", "WeightsError", "architecture", "cache_dir", "check_finite",
           "detect_layout", "download", "file_sha256", "from_ours", "jsonable_config", "load_weights",
           "read_metadata", "read_state_dict", "save_weights", "to_ours"]
