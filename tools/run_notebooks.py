"""Execute the walkthrough notebooks top to bottom, the way CI does, and fail on the first error.

    python tools/run_notebooks.py notebooks/*.ipynb            # execute, report time per notebook
    python tools/run_notebooks.py --write notebooks/*.ipynb    # ... and save the fresh outputs into the files

Each notebook runs in a fresh `python3` kernel (ipykernel, installed by requirements.txt via jupyter) with its
own folder as the working directory, so paths such as "../weights/blip2-shapes-tiny" resolve as they do for a
reader who opens the notebook in Jupyter. A cell that raises, or runs longer than --timeout seconds, fails the
run: the exit status is the number of failed notebooks. Without --write the files are left untouched, so a CI
run never changes the committed outputs.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError


def run(path: Path, timeout: int, write: bool) -> float:
    """Execute one notebook in place (in memory); return the seconds it took. Raises on any cell error."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    if write:
        for cell in nb.cells:  # keep diffs small: no per-run execution timestamps in the committed files
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(nb, path)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed per cell (default 300)")
    parser.add_argument("--write", action="store_true", help="save the executed outputs back into the files")
    args = parser.parse_args(argv)

    # Keep the kernels to a few threads: the notebooks are small, and CI machines are shared.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    failed = 0
    for path in args.notebooks:
        if not path.is_file():
            print(f"FAIL {path}: no such notebook", flush=True)
            failed += 1
            continue
        try:
            seconds = run(path, args.timeout, args.write)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
            print(f"FAIL {path}\n{e}", flush=True)
            failed += 1
            continue
        print(f"ok   {path}  {seconds:6.1f} s{'  (outputs written)' if args.write else ''}", flush=True)
    print(f"{len(args.notebooks) - failed}/{len(args.notebooks)} notebooks ran without error")
    return failed


if __name__ == "__main__":
    sys.exit(main())
