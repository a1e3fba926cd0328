"""Command line: `python -m blip2_mini {caption,vqa,match,rank,stages,pretrain,evaluate} ...`; `--help` on each.

Errors in what the user asked for (a missing weights directory, num_beams 0, ...) print one line and exit 2.
An unreadable image is reported on stderr and skipped; the exit status is then 1.
"""

import argparse
import json
import sys
from pathlib import Path

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "blip2-shapes-tiny"
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
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_model_options(p):
    p.add_argument("--weights", type=Path, default=None,
                   help=f"checkpoint directory (default: the shipped toy model, {DEFAULT_WEIGHTS.name})")
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
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: score / length**penalty (>0 favours long, <0 short)")
    g.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="1.0 = off; 1.5 is strong")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam search")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k most likely (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="random seed for --sample")


def build_parser():
    parser = OneLineParser(prog="python -m blip2_mini", description="BLIP-2 from scratch: caption, "
                                     "question and match images with the official checkpoints or the toy model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption images or folders of images")
    p.add_argument("images", nargs="+", type=Path, help="image files and/or directories")
    p.add_argument("--prompt", default=None, help='text the caption continues, e.g. "a photo of"')
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    p.add_argument("--json", action="store_true", help="one JSON object per line: image, text, token_ids")
    add_model_options(p)
    add_generation_options(p)

    p = sub.add_parser("vqa", help="answer a question about an image")
    p.add_argument("image", type=Path)
    p.add_argument("question")
    p.add_argument("--history", nargs=2, action="append", metavar=("QUESTION", "ANSWER"), default=[],
                   help="an earlier chat turn (repeatable): the prompt becomes a multi-turn chat")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_model_options(p)
    add_generation_options(p)
    p.set_defaults(max_new_tokens=10)

    p = sub.add_parser("match", help="retrieval checkpoints: ITM probability and ITC score of texts for an image")
    p.add_argument("image", type=Path)
    p.add_argument("texts", nargs="+")
    add_model_options(p)

    p = sub.add_parser("rank", help="retrieval checkpoints: rank the images of a folder for a text query")
    p.add_argument("folder", type=Path)
    p.add_argument("query")
    p.add_argument("--top-k", type=positive_int, default=5, help="how many to show (and re-rank with ITM)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    add_model_options(p)

    # These two have their own argument parsers (in blip2_mini/pretrain/); `main` hands them the rest of argv.
    sub.add_parser("pretrain", add_help=False, help="run the toy two-stage pre-training (see its --help)")
    sub.add_parser("evaluate", add_help=False, help="quality metrics of a toy model on held-out data (see its --help)")

    p = sub.add_parser("stages", help="run one image through every stage and print the shapes")
    p.add_argument("image", type=Path)
    add_model_options(p)
    return parser


def check_generation_options(args):
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.min_new_tokens > args.max_new_tokens:
        raise UsageError(f"--min-new-tokens ({args.min_new_tokens}) exceeds --max-new-tokens ({args.max_new_tokens})")
    if args.sample and args.num_beams > 1:
        raise UsageError("--sample and --num-beams > 1 cannot be combined (beam sampling is not supported)")


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
        if not (DEFAULT_WEIGHTS / "config.json").exists():
            raise UsageError("no --weights given and no shipped model in weights/; download a checkpoint "
                             "(see weights/README.md) and pass --weights DIR")
        weights = DEFAULT_WEIGHTS
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {args.device}: {str(e).splitlines()[0]}") from None
    dtype, policy = auto_dtype(args.device) if args.dtype == "auto" else (getattr(torch, args.dtype), None)
    try:
        return load(weights, dtype=dtype, device=args.device, dtype_policy=policy, progress=sys.stderr.isatty(),
                    quantize=args.quantize, prepack=args.prepack)
    except (CheckpointError, OSError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None


def expand_images(paths):
    """Files as given, directories expanded to their image files (sorted). Missing paths are reported."""
    found, missing = [], []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            missing.append(path)
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
    if sys.stderr.isatty() or done == total:
        width = 30
        bar = "#" * (width * done // max(total, 1))
        print(f"\r{label} [{bar:<{width}}] {done}/{total}", end="\n" if done == total else "", file=sys.stderr,
              flush=True)


def family_of(model):
    return "t5" if model.is_encoder_decoder else "opt"


# ---- commands --------------------------------------------------------------------------------------------


def cmd_caption(args):
    check_generation_options(args)
    paths, missing = expand_images(args.images)
    for path in missing:
        print(f"error: {path}: no such file or directory", file=sys.stderr)
    if not paths and not missing:
        raise UsageError("no images found in " + ", ".join(map(str, args.images)))
    model, processor = load_checkpoint(args)
    failures = len(missing)
    for start in range(0, len(paths), args.batch_size):
        loaded, failed = read_images(paths[start:start + args.batch_size])
        for path, reason in failed:
            print(f"error: {path}: {reason}", file=sys.stderr)
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
    model, processor = load_checkpoint(args)
    loaded, failed = read_images([args.image])
    if failed:
        print(f"error: {failed[0][0]}: {failed[0][1]}", file=sys.stderr)
        return 1
    try:
        prompt = chat_prompt([tuple(turn) for turn in args.history], args.question, family_of(model))
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
        raise UsageError("match/rank need a retrieval checkpoint (blip2-itm-vit-g); this one has a language model")


def cmd_match(args):
    from .retrieval import match_scores

    model, processor = load_checkpoint(args)
    require_retrieval(model)
    loaded, failed = read_images([args.image])
    if failed:
        print(f"error: {failed[0][0]}: {failed[0][1]}", file=sys.stderr)
        return 1
    for text, itm, itc in match_scores(model, processor, loaded[0][1], args.texts, device=args.device):
        print(f"ITM {itm:.4f}  ITC {itc:+.4f}  {text}")
    return 0


def cmd_rank(args):
    from .retrieval import rank_images

    if not args.folder.is_dir():
        raise UsageError(f"{args.folder}: not a directory")
    paths, _ = expand_images([args.folder])
    if not paths:
        raise UsageError(f"{args.folder}: no images found")
    model, processor = load_checkpoint(args)
    require_retrieval(model)
    loaded, failed = read_images(paths)
    for path, reason in failed:
        print(f"error: {path}: {reason}", file=sys.stderr)
    results = rank_images(model, processor, loaded, args.query, top_k=args.top_k, batch_size=args.batch_size,
                          device=args.device, on_progress=lambda d, t: progress(d, t, "embedding images"))
    for rank, (path, itc, itm) in enumerate(results, 1):
        print(f"{rank:2d}. ITM {itm:.4f}  ITC {itc:+.4f}  {path}")
    return 1 if failed else 0


def cmd_stages(args):
    import torch

    model, processor = load_checkpoint(args)
    loaded, failed = read_images([args.image])
    if failed:
        print(f"error: {failed[0][0]}: {failed[0][1]}", file=sys.stderr)
        return 1
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
    try:
        if argv and argv[0] in PASSTHROUGH:
            import importlib

            # Their main() returns its report (eval.json's numbers) to Python callers; the shell gets 0.
            importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, ValueError) as e:
        # ValueError: the library's own one-line complaints about input (an empty text, a text longer than the
        # position table, an impossible generation option), shown as such rather than as a traceback.
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
