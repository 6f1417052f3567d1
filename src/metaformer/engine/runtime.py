"""Process-group helpers shared by the trainers."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

from ..errors import ConfigError, MetaFormerError

T = TypeVar("T")


def on_main(fn: Callable[[], T], is_main: bool) -> T | None:
    """Run ``fn`` on rank 0 only; a user error it raises is raised on every rank with the same message,
    so no rank waits forever in a collective the others never reach."""
    error, result = None, None
    if is_main:
        try:
            result = fn()
        except MetaFormerError as e:
            error = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)
    return result
