"""Command line: `python -m blip2_mini {caption,vqa,match,rank,stages,pretrain,evaluate} ...`; `--help` on each.

Errors in what the user asked for (a missing weights directory, num_beams 0, ...) print one line and exit 2.
An unreadable image is reported on stderr and skipped; the exit status is then 1.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "blip2-shapes-tiny"
DEFAULT_RETRIEVAL_WEIGHTS = DEFAULT_WEIGHTS.with_name(DEFAULT_WEIGHTS.name + "-itm")  # for match and rank
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DTYPES = ("float32", "bfloat16", "float16", "auto")


class UsageError(Exception):
    """A problem with what the user asked for: one line on stderr, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error in the arguments is one line, like every other usage error here (argparse's own
    prints the whole usage block first, which buries the line that matters)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


# ---- arguments -------------------------------------------------------------------------------------------


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {value}")
    return value


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return value


def seed(text):
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def add_model_options(p, retrieval=False):
    default = DEFAULT_RETRIEVAL_WEIGHTS if retrieval else DEFAULT_WEIGHTS
    p.set_defaults(default_weights=default)
    p.add_argument("--weights", type=Path, default=None,
                   help=f"checkpoint directory (default: the shipped toy model, {default.name})")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weight dtype (default float32); auto: what fits this machine (loader.auto_dtype: on a "
                        "CPU with bf16 instructions, vision and language model in bfloat16)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--quantize", choices=["int8", "int8-dynamic"], default=None,
                   help="CPU: the language model in int8 while loading (blip2_mini/quantize.py); int8-dynamic is "
                        "the faster kernel, int8 the more accurate one")
    p.add_argument("--prepack", action="store_true",
                   help="CPU: keep the float weights in oneDNN's blocked layout (cpu.PackedLinear): same numbers, "
                        "faster captions, a few seconds more loading (worth it for a folder or beam search)")


def add_generation_options(p):
    g = p.add_argument_group("generation")
    g.add_argument("--num-beams", type=positive_int, default=1, help="beam search width (1 = greedy)")
    g.add_argument("--max-new-tokens", type=positive_int, default=30, help="at most this many new tokens")
    g.add_argument("--min-new-tokens", type=non_negative_int, default=0, help="at least this many before EOS")
    g.add_argument("--length-penalty", type=finite_float, default=1.0,
                   help="with --num-beams > 1: score / length**penalty (>0 favours long, <0 short)")
    g.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="1.0 = off; 1.5 is strong")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam search")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="with --sample: sampling temperature")
    g.add_argument("--top-k", type=non_negative_int, default=50,
                   help="with --sample: sample among the k most likely (0 = off; 50 as in transformers)")
    g.add_argument("--top-p", type=float, default=1.0, help="with --sample: nucleus sampling mass in (0, 1] (1 = off)")
    g.add_argument("--seed", type=seed, default=0, help="with --sample: random seed")


def build_parser():
    parser = OneLineParser(prog="python -m blip2_mini", description="BLIP-2 from scratch: caption, "
                                     "question and match images with the official checkpoints or the toy model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption images or folders of images")
    p.add_argument("images", nargs="+", type=Path, help="image files and/or directories")
    p.add_argument("--prompt", default=None, help='text the caption continues, e.g. "a photo of"')
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line and image: image, text, token_ids (or image, error)")
    add_model_options(p)
    add_generation_options(p)

    p = sub.add_parser("vqa", help="answer a question about an image")
    p.add_argument("image", type=Path, help="an image file")
    p.add_argument("question", help='the question; the prompt becomes "Question: ... Answer:"')
    p.add_argument("--history", nargs=2, action="append", metavar=("QUESTION", "ANSWER"), default=[],
                   help="an earlier chat turn (repeatable): the prompt becomes a multi-turn chat")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_model_options(p)
    add_generation_options(p)
    p.set_defaults(max_new_tokens=10)

    p = sub.add_parser("match", help="retrieval checkpoints: ITM probability and ITC score of texts for an image")
    p.add_argument("image", type=Path, help="an image file")
    p.add_argument("texts", nargs="+", help="the texts to score against it")
    add_model_options(p, retrieval=True)

    p = sub.add_parser("rank", help="retrieval checkpoints: rank the images of a folder for a text query")
    p.add_argument("folder", type=Path, help="a folder of images")
    p.add_argument("query", help="the text to rank them for")
    p.add_argument("--top-k", type=positive_int, default=5,
                   help="how many to show: the best by ITC, re-ranked by ITM logit + ITC (the paper's recipe)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    add_model_options(p, retrieval=True)

    # These two have their own argument parsers (in blip2_mini/pretrain/); `main` hands them the rest of argv.
    sub.add_parser("pretrain", add_help=False, help="run the toy two-stage pre-training (see its --help)")
    sub.add_parser("evaluate", add_help=False, help="quality metrics of a toy model on held-out data (see its --help)")

    p = sub.add_parser("stages", help="run one image through every stage and print the shapes")
    p.add_argument("image", type=Path, help="an image file")
    add_model_options(p)
    return parser


def check_generation_options(args):
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.min_new_tokens > args.max_new_tokens:
        raise UsageError(f"--min-new-tokens ({args.min_new_tokens}) exceeds --max-new-tokens ({args.max_new_tokens})")
    if args.sample and args.num_beams > 1:
        raise UsageError("--sample and --num-beams > 1 cannot be combined (beam sampling is not supported)")
    # An option that would be ignored is refused: who types --temperature 0.7 expects sampling, not greedy.
    if not args.sample:
        sampling = (("--temperature", args.temperature, 1.0), ("--top-k", args.top_k, 50), ("--top-p", args.top_p, 1.0),
                    ("--seed", args.seed, 0))
        unused = [name for name, value, default in sampling if value != default]
        if unused:
            raise UsageError(f"{', '.join(unused)} only appl{'ies' if len(unused) == 1 else 'y'} with --sample; "
                             "add --sample or drop them")
    if args.num_beams == 1 and args.length_penalty != 1.0:
        raise UsageError("--length-penalty only applies with --num-beams > 1 (it divides beam scores)")


def generation_kwargs(args):
    import torch

    kwargs = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
                  length_penalty=args.length_penalty, repetition_penalty=args.repetition_penalty)
    if args.sample:
        kwargs.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      generator=torch.Generator(args.device).manual_seed(args.seed))
    return kwargs


# ---- model and images ------------------------------------------------------------------------------------


def load_checkpoint(args):
    import torch

    from .loader import CheckpointError, auto_dtype, load

    weights = args.weights
    if weights is None:
        if not (args.default_weights / "config.json").exists():
            raise UsageError("no --weights given and no shipped model in weights/; download a checkpoint "
                             "(see weights/README.md) and pass --weights DIR")
        weights = args.default_weights
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {args.device}: {str(e).splitlines()[0][:200]}") from None
    if torch.device(args.device).type == "meta":  # shapes without values: fine for tests, useless for a caption
        raise UsageError("--device meta: not a device to compute on (cpu, cuda, cuda:1, mps, ...)")
    dtype, policy = auto_dtype(args.device) if args.dtype == "auto" else (getattr(torch, args.dtype), None)
    try:
        return load(weights, dtype=dtype, device=args.device, dtype_policy=policy, progress=sys.stderr.isatty(),
                    quantize=args.quantize, prepack=args.prepack)
    except (CheckpointError, OSError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None


def expand_images(paths):
    """(found, missing): files as given, directories expanded to their image files (sorted; not into
    subfolders). `missing` pairs a path with why it was not read."""
    found, missing = [], []
    for path in paths:
        if path.is_dir():
            try:
                found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            except OSError as e:
                missing.append((path, f"cannot list the folder ({e.strerror or e})"))
        elif path.exists():
            found.append(path)
        else:
            missing.append((path, "no such file or directory"))
    return found, missing


def read_images(paths):
    """(loaded [(path, PIL image)], failed [(path, reason)]): unreadable images are skipped, not fatal."""
    from .processing import load_image

    loaded, failed = [], []
    for path in paths:
        try:
            loaded.append((path, load_image(path)))
        except (OSError, ValueError) as e:  # load_image's messages start with the path: printed once by callers
            failed.append((path, str(e).splitlines()[0].removeprefix(f"{path}: ")))
    return loaded, failed


def progress(done, total, label):
    """A bar on stderr, redrawn in place on a terminal (end_progress_line wipes it before other lines are
    written); elsewhere (a log file, a pipe) only the final state."""
    if sys.stderr.isatty() or done == total:
        width = 30
        bar = "#" * (width * done // max(total, 1))
        print(f"\r{label} [{bar:<{width}}] {done}/{total}", end="\n" if done == total else "", file=sys.stderr,
              flush=True)


def end_progress_line():
    """Erase an unfinished bar (terminal only), so that the lines printed next start at the left margin."""
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)


# ---- commands --------------------------------------------------------------------------------------------


def report_failures(failed, as_json=False):
    """Each (path, reason) on stderr; with --json also a record on stdout, so that every input has its line."""
    for path, reason in failed:
        print(f"error: {path}: {reason}", file=sys.stderr)
        if as_json:
            print(json.dumps({"image": str(path), "error": reason}), flush=True)


def no_images(where) -> UsageError:
    return UsageError(f"no images ({' '.join(sorted(IMAGE_SUFFIXES))}) found in {where}")


def cmd_caption(args):
    check_generation_options(args)
    paths, missing = expand_images(args.images)
    report_failures(missing, args.json)
    if not paths:
        if missing:
            return 1
        raise no_images(", ".join(map(str, args.images)))
    model, processor = load_checkpoint(args)
    failures = len(missing)
    for start in range(0, len(paths), args.batch_size):
        loaded, failed = read_images(paths[start:start + args.batch_size])
        end_progress_line()
        report_failures(failed, args.json)
        failures += len(failed)
        if loaded:
            names, images = zip(*loaded)
            text = None if args.prompt is None else [args.prompt] * len(images)
            inputs = processor(images=list(images), text=text, return_tensors="pt")
            ids = model.generate(**{k: v.to(args.device) for k, v in inputs.items()}, **generation_kwargs(args))
            for name, row, caption in zip(names, ids.tolist(), processor.batch_decode(ids)):
                if args.json:
                    print(json.dumps({"image": str(name), "text": caption, "token_ids": row}), flush=True)
                else:
                    print(f"{name}: {caption}", flush=True)
        progress(min(start + args.batch_size, len(paths)), len(paths), "captioning")
    return 1 if failures else 0


def cmd_vqa(args):
    from .prompts import chat_prompt

    check_generation_options(args)
    loaded, failed = read_images([args.image])  # before loading: a typo should not cost a minute of loading
    if failed:
        report_failures(failed)
        return 1
    model, processor = load_checkpoint(args)
    try:
        prompt = chat_prompt([tuple(turn) for turn in args.history], args.question, model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    inputs = processor(images=[loaded[0][1]], text=[prompt], return_tensors="pt")
    ids = model.generate(**{k: v.to(args.device) for k, v in inputs.items()}, **generation_kwargs(args))
    answer = processor.batch_decode(ids)[0]
    print(json.dumps({"image": str(args.image), "prompt": prompt, "text": answer, "token_ids": ids[0].tolist()})
          if args.json else answer)
    return 0


def require_retrieval(model):
    if model.language_model is not None:
        raise UsageError("match/rank need a retrieval checkpoint (blip2-itm-vit-g, or the shipped "
                         f"{DEFAULT_RETRIEVAL_WEIGHTS.name}); this one has a language model")


def cmd_match(args):
    from .retrieval import match_scores

    loaded, failed = read_images([args.image])
    if failed:
        report_failures(failed)
        return 1
    model, processor = load_checkpoint(args)
    require_retrieval(model)
    for text, itm, itc in match_scores(model, processor, loaded[0][1], args.texts, device=args.device):
        print(f"ITM {itm:.4f}  ITC {itc:+.4f}  {text}")
    return 0


def cmd_rank(args):
    from .retrieval import rank_images

    if not args.folder.is_dir():
        raise UsageError(f"{args.folder}: not a directory")
    paths, _ = expand_images([args.folder])
    if not paths:
        raise no_images(args.folder)
    model, processor = load_checkpoint(args)
    require_retrieval(model)
    # Every image is needed twice (ITC over all, ITM over the best): keep each at the model's input size, not
    # as the decoded photo (~35 MB at 12 Mpx), which gives the same numbers (ImageProcessor.resized).
    loaded, failed = [], []
    for i, path in enumerate(paths, 1):
        ok, bad = read_images([path])
        loaded += [(name, processor.image_processor.resized(image, str(name))) for name, image in ok]
        failed += bad
        progress(i, len(paths), "reading images")
    report_failures(failed)
    results = rank_images(model, processor, loaded, args.query, top_k=args.top_k, batch_size=args.batch_size,
                          device=args.device, on_progress=lambda d, t: progress(d, t, "embedding images"))
    for rank, (path, itc, itm) in enumerate(results, 1):
        print(f"{rank:2d}. ITM {itm:.4f}  ITC {itc:+.4f}  {path}")
    return 1 if failed else 0


def cmd_stages(args):
    import torch

    loaded, failed = read_images([args.image])
    if failed:
        report_failures(failed)
        return 1
    model, processor = load_checkpoint(args)
    pixel_values = processor(images=[loaded[0][1]], return_tensors="pt")["pixel_values"].to(args.device)

    def show(name, t):
        print(f"{name:<28} {str(tuple(t.shape)):<18} mean {t.float().mean():+.4f}  std {t.float().std():.4f}")

    with torch.no_grad():
        show("pixel_values (B,3,H,W)", pixel_values)
        image_embeds = model.encode_image(pixel_values)
        show("encode_image (B,P,Dv)", image_embeds)
        query_output = model.query(image_embeds)
        show("query (B,Q,Dq)", query_output)
        if model.language_model is not None:
            show("project (B,Q,Dlm)", model.project(query_output))
            ids = model.generate(pixel_values, max_new_tokens=20)
            print(f"{'caption':<28} {processor.batch_decode(ids)[0]!r}")
        else:
            show("image_embeds (B,Q,E)", model.image_embeds(pixel_values))
    return 0


COMMANDS = {"caption": cmd_caption, "vqa": cmd_vqa, "match": cmd_match, "rank": cmd_rank, "stages": cmd_stages}


PASSTHROUGH = {"pretrain": "blip2_mini.pretrain.run", "evaluate": "blip2_mini.pretrain.evaluate"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8 is printed as its bytes, as ls does,
        sys.stdout.reconfigure(errors="surrogateescape")  # not an encoding error that ends the folder
    try:
        if argv and argv[0] in PASSTHROUGH:
            import importlib

            # Their main() returns its report (eval.json's numbers) to Python callers; the shell gets 0.
            importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `... | head`: the reader has gone; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except (UsageError, ValueError, OSError) as e:
        # ValueError: the library's own one-line complaints about input (an empty text, a text longer than the
        # position table, an impossible generation option), shown as such rather than as a traceback; OSError:
        # a file that cannot be read or written (pretrain's and evaluate's outputs, tokenizer files).
        end_progress_line()
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
