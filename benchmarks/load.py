"""Load benchmark (issue 3): blip2_mini.load_model vs transformers' from_pretrained on the same checkpoint.

    python benchmarks/load.py [--shape full|quarter|tiny] [--dtype fp32,bf16] [--rounds 2] [--threads 2]

The checkpoint is bench.py's (built once, cached under benchmarks/cache/): blip2-opt-2.7b-shaped random
weights, sharded fp32 safetensors with an index, as published. Each measurement runs in a fresh process,
ours and the reference alternately, `--rounds` times; the best time of each is reported.

Per process:
- load: wall time of the call (config, skeleton, reading and casting every tensor);
- load + touch: the same, plus reading one value in every 4 KiB page of every weight. Both loaders leave
  same-dtype weights memory-mapped (fp32 -> fp32 "loads" without reading the file); touching makes the
  comparison fair and makes the weights resident, so that
- peak RSS (the kernel's high-water mark, VmHWM) counts the whole model. The target is peak RSS <= 1.15x
  the loaded model's bytes and a load time no worse than the reference's.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (CACHE, ROOT, _cpu_name, _version, build_checkpoint, module_bytes, rss_now_gb,  # noqa: E402
                   rss_peak_gb, touch_every_page)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def worker(impl: str, variant: str, directory: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    baseline = rss_now_gb()
    start = time.perf_counter()
    if impl == "ours":
        sys.path.insert(0, str(ROOT))
        from blip2_mini import load_model
        model = load_model(directory, dtype=DTYPES[variant], progress=False)
    else:
        import transformers
        from transformers import Blip2ForConditionalGeneration
        transformers.logging.set_verbosity_error()
        model = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=DTYPES[variant])
    load_s = time.perf_counter() - start
    touch_every_page(model)
    touched_s = time.perf_counter() - start
    return {"impl": impl, "variant": variant, "load_s": load_s, "load_touch_s": touched_s,
            "peak_gb": rss_peak_gb(), "baseline_gb": baseline, "model_gb": module_bytes(model) / 1e9,
            "loadavg": os.getloadavg()[0]}


def run(impl, variant, args) -> dict:
    command = [sys.executable, __file__, "--worker", impl, "--dtype", variant, "--shape", args.shape,
               "--threads", str(args.threads)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{impl} {variant} failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"[{time.strftime('%H:%M:%S')}] {impl:9s} {variant}: load {r['load_s']:.2f} s, + touch "
          f"{r['load_touch_s']:.2f} s, peak {r['peak_gb']:.2f} GB for a {r['model_gb']:.2f} GB model "
          f"(load average {r['loadavg']:.1f})", file=sys.stderr, flush=True)
    return r


def report(args, results) -> str:
    best = {}
    for r in results:
        key = (r["impl"], r["variant"])
        b = best.setdefault(key, dict(r))
        for k in ("load_s", "load_touch_s", "peak_gb"):
            b[k] = min(b[k], r[k])
        b["loadavg"] = max(b["loadavg"], r["loadavg"])
    lines = [f"# Load benchmark: blip2_mini vs transformers {_version('transformers')} ({args.shape} shape)", "",
             f"Command: `python benchmarks/load.py --shape {args.shape} --dtype {args.dtype} --rounds {args.rounds}"
             f" --threads {args.threads}`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {_cpu_name()}; {args.threads} threads;"
             f" torch {torch.__version__}; checkpoint: fp32 safetensors shards with an index (random weights), "
             "read from the OS file cache (warm).  ",
             f"Each figure is the best of {args.rounds} fresh processes (ours and the reference alternately); the "
             "highest load average seen at their start is in the last column.", "",
             "| loaded as | impl | load | load + touch every page | peak RSS | model bytes | peak / model | "
             "load: ours / ref | target met | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for variant in args.dtype.split(","):
        ours, ref = best.get(("ours", variant)), best.get(("reference", variant))
        for r in (ours, ref):
            if r is None:
                continue
            ratio, met = "", ""
            if r is ours and ref is not None:
                ratio = f"{ours['load_touch_s'] / ref['load_touch_s']:.2f}x"
                ok = ours["peak_gb"] <= 1.15 * ours["model_gb"] and ours["load_touch_s"] <= ref["load_touch_s"]
                met = "yes" if ok else "no"
            lines.append(f"| {variant} | {'blip2_mini' if r is ours else 'transformers'} | {r['load_s']:.2f} s | "
                         f"{r['load_touch_s']:.2f} s | {r['peak_gb']:.2f} GB | {r['model_gb']:.2f} GB | "
                         f"{r['peak_gb'] / r['model_gb']:.2f}x | {ratio} | {met} | {r['loadavg']:.1f} |")
    lines += ["", "Targets (issue 3): peak RSS <= 1.15x the loaded model's bytes; load + touch no slower than the "
              "reference. The ratio column compares load + touch, the time until the weights are in memory.", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["full", "quarter", "tiny"], default="full")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = CACHE / f"blip2-opt-2.7b-{args.shape}"
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, directory, args.threads)))
        return
    unknown = [v for v in args.dtype.split(",") if v not in DTYPES]
    if unknown:
        parser.error(f"unknown --dtype {unknown}; choose from {', '.join(DTYPES)}")
    print(f"checkpoint: {build_checkpoint(args.shape)}", file=sys.stderr)
    results = []
    for _ in range(args.rounds):
        for variant in args.dtype.split(","):
            results += [run("ours", variant, args), run("reference", variant, args)]
    path = ROOT / "benchmarks" / f"RESULTS-load-{args.shape}.md"
    path.write_text(report(args, results))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
