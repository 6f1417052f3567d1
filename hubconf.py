"""torch.hub entry points: ``torch.hub.load('<this repo>', 'poolformer_s12', pretrained=True)``."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

dependencies = ["torch", "torchvision", "timm", "safetensors"]

from metaformer import create_model, list_models  # noqa: E402
from metaformer.tools.hub import from_pretrained  # noqa: E402,F401


def _entry(name):
    def entry(pretrained=False, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__doc__ = f"{name} (see metaformer.create_model for the arguments)"
    return entry


for _name in list_models():
    globals()[_name] = _entry(_name)
