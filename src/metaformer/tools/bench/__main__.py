"""``python -m metaformer.tools.bench --memprobe SPEC``: one training step's peak memory, in the fresh process
:func:`~.memory.train_memory` starts for it (the benchmark itself is ``metaformer bench``)."""
import sys

from .memory import memprobe

if len(sys.argv) == 3 and sys.argv[1] == "--memprobe":
    memprobe(sys.argv[2])
else:
    sys.exit("usage: metaformer bench ... (this module is the harness's library; its command is metaformer bench)")
