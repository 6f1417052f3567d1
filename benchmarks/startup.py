"""Start-up cost of the CLI, each command in a fresh interpreter, median of ``--repeats``:

- after torch: seconds from after ``import torch`` (which a command that works pays anyway) to the end of
  ``metaformer --help``, ``--version``, ``info``, and of ``import metaformer``;
- whole: the same from the first line of a fresh interpreter (what a user waits for, torch included when the
  command imports it).

    python benchmarks/startup.py
    python benchmarks/startup.py --src OTHER_CHECKOUT/src     # another version of the package, same environment
"""
import argparse
import statistics
import subprocess
import sys

CHILD = """
import contextlib, io, sys, time
t = time.perf_counter()
{torch}
if {src!r}:
    sys.path.insert(0, {src!r})
t = time.perf_counter() if {after_torch} else t
{body}
print(time.perf_counter() - t)
"""
RUN = """from metaformer.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({argv!r})
    except SystemExit:
        pass"""


def seconds(src: str, argv: list[str] | None, after_torch: bool) -> float:
    body = RUN.format(argv=argv) if argv is not None else "import metaformer"
    code = CHILD.format(src=src, after_torch=after_torch, body=body,
                        torch="import torch  # noqa: F401" if after_torch else "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="", help="put this folder first on sys.path (another checkout's src/)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for argv in (["--help"], ["--version"], ["info"], None):
        what = f"metaformer {' '.join(argv)}" if argv is not None else "import metaformer"
        cols = []
        for after_torch in (True, False):
            runs = [seconds(args.src, argv, after_torch) for _ in range(args.repeats)]
            cols.append(f"{'after torch' if after_torch else 'whole'} {statistics.median(runs):5.2f} s "
                        f"(min {min(runs):.2f}, max {max(runs):.2f})")
        print(f"{what:<22} " + "   ".join(cols))


if __name__ == "__main__":
    main()
