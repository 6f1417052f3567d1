"""Start-up cost of the CLI: seconds from after ``import torch`` (which every user pays anyway) to the end of
``metaformer --help`` and ``metaformer info``, each in a fresh interpreter, median of ``--repeats``.

    python benchmarks/startup.py
    python benchmarks/startup.py --src OTHER_CHECKOUT/src     # another version of the package, same environment
"""
import argparse
import statistics
import subprocess
import sys

CHILD = """
import contextlib, io, sys, time
import torch  # noqa: F401  the clock starts after torch
if {src!r}:
    sys.path.insert(0, {src!r})
t = time.perf_counter()
from metaformer.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({argv!r})
    except SystemExit:
        pass
print(time.perf_counter() - t)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="", help="put this folder first on sys.path (another checkout's src/)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for argv in (["--help"], ["info"], []):
        code = CHILD.format(src=args.src, argv=argv) if argv else (
            "import sys, time, torch\n" + (f"sys.path.insert(0, {args.src!r})\n" if args.src else "")
            + "t = time.perf_counter()\nimport metaformer\nprint(time.perf_counter() - t)")
        runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                      .stdout.split()[-1]) for _ in range(args.repeats)]
        what = f"metaformer {' '.join(argv)}" if argv else "import metaformer"
        print(f"{what:<20} median {statistics.median(runs):.2f} s  (min {min(runs):.2f}, max {max(runs):.2f})")


if __name__ == "__main__":
    main()
