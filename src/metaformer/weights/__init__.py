"""Weights I/O: files and the download cache (``io``), checkpoint layouts and their conversion
(``layouts``), strict loading (``load``) and self-describing saving (``save``). Depends only on
``metaformer.models``."""
from .io import WeightsError, read_state_dict
from .layouts import LAYOUTS, detect_layout, from_ours, to_ours
from .load import LoadReport, architecture, load_weights
from .save import jsonable_config, read_metadata, save_weights

__all__ = ["LAYOUTS", "LoadReport", "WeightsError", "architecture", "detect_layout", "from_ours", "jsonable_config",
           "load_weights", "read_metadata", "read_state_dict", "save_weights", "to_ours"]
