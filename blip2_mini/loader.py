"""Load an official BLIP-2 checkpoint directory into blip2_mini's modules.

A published checkpoint (e.g. Salesforce/blip2-opt-2.7b, as `hf download` writes it) is a directory with
`config.json`, the weights (one `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` listed in
`model.safetensors.index.json`, or the older `pytorch_model.bin` files), and processor/tokenizer files.

The weight names are those of the reference implementation. blip2_mini's modules use shorter names, and the
translation is the single table `KEY_MAP` below: read it to see where every official tensor goes. `{}` stands
for a layer index; `.weight`/`.bias` suffixes carry over unchanged. The few tensors that are not a plain
rename are handled by named special cases in `_special_case`:
- the ViT's fused `qkv.bias` (3*Dv, with zeros for k) becomes `q_bias` and `v_bias`; the original LAVIS form
  stores `q_bias`/`v_bias` already;
- tied copies (OPT's `lm_head.weight`, T5's `encoder/decoder.embed_tokens.weight`) duplicate a tensor we
  already load, and are skipped;
- non-persistent buffers that older files carry (`position_ids`) are skipped.

Loading is strict: every parameter must receive exactly one tensor of the right shape, else one error lists
what is missing, unexpected or mismatched. (The reference silently initialises missing weights at random.)
It is also frugal: the model is created on the `meta` device (no memory), and each tensor is read from the
memory-mapped file, cast to its target dtype and moved to the target device one at a time, so peak memory
is about the loaded model's size and a GPU user never holds a CPU copy of the whole model. A tensor that is
already in its target dtype, on the CPU, is not copied at all: the parameter *is* the file's bytes (a private,
copy-on-write mapping, so the file never changes), paged in by the OS when first used -- the reason an fp32
checkpoint "loads" in about a second. The other direction does not hold: a file overwritten in place while a
process uses it changes that process's weights (the OS reads the pages again from the file).
The older `.bin` files are read through torch.load's own mapping (weights_only=True), whose pages stay in the
process until the whole file is read: loading one to another dtype peaks at about file + model (measured: 226 MB
fp32 file to bf16, +343 MB instead of +120 MB from safetensors). Prefer the .safetensors files.
"""

import ctypes
import json
import mmap
import pickle
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

from .config import Blip2Config, ConfigError
from .cpu import cpu_multiplies_bf16_faster
from .cpu import prepack as cpu_prepack
from .model import Blip2
from .quantize import (Int8Linear, fused_projections, linears_to_quantize, packs_for_fbgemm, quantize_weight,
                       replace_module, store_head_in_fp16)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what is wrong and what to do."""


# official name (without .weight/.bias)                        -> blip2_mini name
KEY_MAP = {
    # frozen image encoder (vit.py, patch_embed.py)
    "vision_model.embeddings.class_embedding":                     "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.position_embedding":                  "vision_model.embeddings.position_embedding",
    "vision_model.embeddings.patch_embedding":                     "vision_model.embeddings.patch_embedding",
    "vision_model.encoder.layers.{}.layer_norm1":                  "vision_model.layers.{}.norm1",
    "vision_model.encoder.layers.{}.self_attn.qkv":                "vision_model.layers.{}.attn.qkv",
    "vision_model.encoder.layers.{}.self_attn.projection":         "vision_model.layers.{}.attn.projection",
    "vision_model.encoder.layers.{}.layer_norm2":                  "vision_model.layers.{}.norm2",
    "vision_model.encoder.layers.{}.mlp.fc1":                      "vision_model.layers.{}.mlp.fc1",
    "vision_model.encoder.layers.{}.mlp.fc2":                      "vision_model.layers.{}.mlp.fc2",
    "vision_model.post_layernorm":                                 "vision_model.post_layernorm",
    # Q-Former (qformer.py): BERT's nested names flattened
    "query_tokens":                                                "query_tokens",
    "qformer.layernorm":                                           "qformer.layernorm",
    "qformer.encoder.layer.{}.attention.attention.query":          "qformer.layers.{}.self_attn.query",
    "qformer.encoder.layer.{}.attention.attention.key":            "qformer.layers.{}.self_attn.key",
    "qformer.encoder.layer.{}.attention.attention.value":          "qformer.layers.{}.self_attn.value",
    "qformer.encoder.layer.{}.attention.output.dense":             "qformer.layers.{}.self_attn.dense",
    "qformer.encoder.layer.{}.attention.output.LayerNorm":         "qformer.layers.{}.self_attn.norm",
    "qformer.encoder.layer.{}.crossattention.attention.query":     "qformer.layers.{}.cross_attn.query",
    "qformer.encoder.layer.{}.crossattention.attention.key":       "qformer.layers.{}.cross_attn.key",
    "qformer.encoder.layer.{}.crossattention.attention.value":     "qformer.layers.{}.cross_attn.value",
    "qformer.encoder.layer.{}.crossattention.output.dense":        "qformer.layers.{}.cross_attn.dense",
    "qformer.encoder.layer.{}.crossattention.output.LayerNorm":    "qformer.layers.{}.cross_attn.norm",
    "qformer.encoder.layer.{}.intermediate_query.dense":           "qformer.layers.{}.ffn_query.fc1",
    "qformer.encoder.layer.{}.output_query.dense":                 "qformer.layers.{}.ffn_query.fc2",
    "qformer.encoder.layer.{}.output_query.LayerNorm":             "qformer.layers.{}.ffn_query.norm",
    "qformer.encoder.layer.{}.intermediate.dense":                 "qformer.layers.{}.ffn_text.fc1",
    "qformer.encoder.layer.{}.output.dense":                       "qformer.layers.{}.ffn_text.fc2",
    "qformer.encoder.layer.{}.output.LayerNorm":                   "qformer.layers.{}.ffn_text.norm",
    "embeddings.word_embeddings":                                  "qformer.embeddings.word_embeddings",
    "embeddings.position_embeddings":                              "qformer.embeddings.position_embeddings",
    # retrieval heads (blip2-itm-vit-g)
    "vision_projection":                                           "vision_projection",
    "text_projection":                                             "text_projection",
    "itm_head":                                                    "itm_head",
    # projection into the language model (model.py)
    "language_projection":                                         "language_projection",
    # OPT (opt.py)
    "language_model.model.decoder.embed_tokens":                   "language_model.embed_tokens",
    "language_model.model.decoder.embed_positions":                "language_model.embed_positions",
    "language_model.model.decoder.layers.{}.self_attn_layer_norm": "language_model.layers.{}.self_attn_norm",
    "language_model.model.decoder.layers.{}.self_attn.q_proj":     "language_model.layers.{}.self_attn.q_proj",
    "language_model.model.decoder.layers.{}.self_attn.k_proj":     "language_model.layers.{}.self_attn.k_proj",
    "language_model.model.decoder.layers.{}.self_attn.v_proj":     "language_model.layers.{}.self_attn.v_proj",
    "language_model.model.decoder.layers.{}.self_attn.out_proj":   "language_model.layers.{}.self_attn.out_proj",
    "language_model.model.decoder.layers.{}.final_layer_norm":     "language_model.layers.{}.ffn_norm",
    "language_model.model.decoder.layers.{}.fc1":                  "language_model.layers.{}.fc1",
    "language_model.model.decoder.layers.{}.fc2":                  "language_model.layers.{}.fc2",
    "language_model.model.decoder.final_layer_norm":               "language_model.final_norm",
    # Flan-T5 (t5.py): T5's numbered sub-layers get names. Encoder blocks have layer.0 = self-attention and
    # layer.1 = feed-forward; decoder blocks insert cross-attention as layer.1, so their feed-forward is layer.2.
    "language_model.shared":                                       "language_model.shared",
    "language_model.lm_head":                                      "language_model.lm_head",
    "language_model.{}.block.{}.layer.0.layer_norm":               "language_model.{}.layers.{}.self_attn_norm",
    "language_model.{}.block.{}.layer.0.SelfAttention.q":          "language_model.{}.layers.{}.self_attn.q",
    "language_model.{}.block.{}.layer.0.SelfAttention.k":          "language_model.{}.layers.{}.self_attn.k",
    "language_model.{}.block.{}.layer.0.SelfAttention.v":          "language_model.{}.layers.{}.self_attn.v",
    "language_model.{}.block.{}.layer.0.SelfAttention.o":          "language_model.{}.layers.{}.self_attn.o",
    "language_model.{}.block.0.layer.0.SelfAttention.relative_attention_bias":
                                                "language_model.{}.layers.0.self_attn.relative_attention_bias",
    "language_model.encoder.block.{}.layer.1.layer_norm":          "language_model.encoder.layers.{}.ffn_norm",
    "language_model.encoder.block.{}.layer.1.DenseReluDense.wi_0": "language_model.encoder.layers.{}.ffn.wi_0",
    "language_model.encoder.block.{}.layer.1.DenseReluDense.wi_1": "language_model.encoder.layers.{}.ffn.wi_1",
    "language_model.encoder.block.{}.layer.1.DenseReluDense.wo":   "language_model.encoder.layers.{}.ffn.wo",
    "language_model.decoder.block.{}.layer.1.layer_norm":          "language_model.decoder.layers.{}.cross_attn_norm",
    "language_model.decoder.block.{}.layer.1.EncDecAttention.q":   "language_model.decoder.layers.{}.cross_attn.q",
    "language_model.decoder.block.{}.layer.1.EncDecAttention.k":   "language_model.decoder.layers.{}.cross_attn.k",
    "language_model.decoder.block.{}.layer.1.EncDecAttention.v":   "language_model.decoder.layers.{}.cross_attn.v",
    "language_model.decoder.block.{}.layer.1.EncDecAttention.o":   "language_model.decoder.layers.{}.cross_attn.o",
    "language_model.decoder.block.{}.layer.2.layer_norm":          "language_model.decoder.layers.{}.ffn_norm",
    "language_model.decoder.block.{}.layer.2.DenseReluDense.wi_0": "language_model.decoder.layers.{}.ffn.wi_0",
    "language_model.decoder.block.{}.layer.2.DenseReluDense.wi_1": "language_model.decoder.layers.{}.ffn.wi_1",
    "language_model.decoder.block.{}.layer.2.DenseReluDense.wo":   "language_model.decoder.layers.{}.ffn.wo",
    "language_model.{}.final_layer_norm":                          "language_model.{}.final_norm",
}

# Checkpoint tensors that duplicate one we load, or buffers we recompute: T5's encoder/decoder `embed_tokens`
# are its `shared` table, and OPT's `lm_head` is its input embedding (opt.py computes the logits from
# `embed_tokens`). T5's `lm_head` is loaded: Flan-T5's head is untied (see `_tie_t5_head` when it is absent).
# Some T5 files also carry a relative-position table for the decoder's cross-attention, which T5 never uses.
SKIPPED = re.compile(r"^(language_model\.(encoder|decoder)\.embed_tokens\.weight|(qformer\.)?embeddings\.position_ids"
                     r"|language_model\.decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight)$")
OPT_TIED_HEAD = "language_model.lm_head.weight"

# Stages kept in fp32 when the rest is loaded in float16, as the reference does: fp16's range (65504) is too
# small for T5's FFN outputs (Flan-T5 was trained in bf16), and the Q-Former was trained in fp32. With bfloat16,
# whose range is fp32's, the reference keeps nothing in fp32 and neither do we by default; the paper's layout
# (Q-Former in fp32) is one `dtype_policy={"qformer": torch.float32, "query_tokens": torch.float32}` away.
KEEP_FP32 = ("query_tokens", "qformer.", "language_model.encoder.layers.*.ffn.wo", "language_model.decoder.layers.*.ffn.wo")


def _compile(pattern: str) -> re.Pattern:
    # "{}" matches a layer index or, for T5, the stack name; the optional suffix is .weight / .bias.
    return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+|encoder|decoder)") + r"(\.weight|\.bias)?$")


_RULES = [(_compile(src), dst) for src, dst in KEY_MAP.items()]


def official_to_ours(name: str) -> str | None:
    """Translate one official tensor name into blip2_mini's name (None if KEY_MAP has no rule for it)."""
    for pattern, dst in _RULES:
        m = pattern.match(name)
        if m:
            *indices, suffix = m.groups()
            return dst.format(*indices) + (suffix or "")
    return None


# ---- reading the files -----------------------------------------------------------------------------------


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the reference's precedence order: one model.safetensors,
    safetensors shards (their index), one pytorch_model.bin, .bin shards (their index)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not all(isinstance(shard, str) and Path(shard).name == shard for shard in shards):
                raise TypeError("shard names must be file names in this directory")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a valid index file ({e.__class__.__name__}); "
                                  "re-download it") from None
        files = [directory / shard for shard in shards]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{directory}: the index names {len(missing)} shard(s) that are not there "
                                  f"({', '.join(missing[:3])}); the download is incomplete, download it again")
        return files
    raise CheckpointError(f"{directory}: no weights found (expected model.safetensors, sharded "
                          "model-*.safetensors with model.safetensors.index.json, or pytorch_model.bin)")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """One .safetensors file, memory-mapped. The format is small enough to read by hand: 8 bytes holding the
    header's length N (little-endian), N bytes of JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}},
    plus an optional "__metadata__"), then the tensors' raw bytes, offsets counted from the end of the header.

    Reading it ourselves (rather than through the `safetensors` package) lets the loader give back the pages of
    a tensor it has already cast (`release`): otherwise a 2 GB fp32 shard stays counted in the process's
    memory while its bf16 copy is built, and peak memory is the model plus a shard instead of about the model."""

    def __init__(self, path: Path):
        size = path.stat().st_size
        corrupt = f"{path}: corrupt or truncated safetensors file ({{}}); download it again"
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(corrupt.format(f"{size} bytes, shorter than a header"))
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(corrupt.format(f"header length {n} > file size {size}"))
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(corrupt.format("header is not JSON")) from None
            if not isinstance(header, dict):
                raise CheckpointError(corrupt.format("header is not a JSON object"))
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
        self.start = 8 + n
        self.entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
        for name, entry in self.entries.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                begin, end = entry["data_offsets"]
                numel = 1
                for d in entry["shape"]:
                    numel *= d
                if not all(type(x) is int and x >= 0 for x in (*entry["shape"], begin, end)):
                    raise ValueError("sizes and offsets are natural numbers")
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(corrupt.format(f"bad header entry for {name}")) from None
            if end - begin != numel * dtype.itemsize or not 0 <= begin <= end <= size - self.start:
                raise CheckpointError(corrupt.format(f"{name} lies outside the file"))

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name`, as a view of the mapped file (no copy; pages are read when first touched)."""
        entry = self.entries[name]
        dtype, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
        if begin == end:
            return torch.empty(entry["shape"], dtype=dtype)
        flat = torch.frombuffer(self.buffer, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self.start + begin)
        return flat.view(entry["shape"])

    def release(self, name: str):
        """Drop this tensor's pages from the process (the OS keeps them in its file cache): call it once the
        tensor has been copied elsewhere and its view is no longer used."""
        begin, end = (self.start + o for o in self.entries[name]["data_offsets"])
        page = mmap.PAGESIZE
        first, last = -(-begin // page) * page, end // page * page  # whole pages only; neighbours share the rest
        if last > first:
            self.buffer.madvise(mmap.MADV_DONTNEED, first, last - first)


def iter_tensors(path: Path):
    """Yield (name, tensor, release) from one weight file, one tensor at a time, on the CPU in the file's dtype.
    `release()` frees the tensor's memory once the caller has copied it. Safetensors files are memory-mapped;
    .bin files are opened with weights_only=True (no arbitrary unpickling)."""
    if path.suffix == ".safetensors":
        file = SafetensorsFile(path)
        for name in file.entries:
            yield name, file.tensor(name), lambda name=name: file.release(name)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # weights_only met an object other than tensors and plain containers
        raise CheckpointError(f"{path}: holds pickled Python objects other than tensors; refusing to unpickle them "
                              "(unpickling can run any code); use the checkpoint's .safetensors files") from None
    except Exception as e:  # a truncated or corrupt zip
        raise CheckpointError(f"{path}: cannot read it ({str(e).splitlines()[0][:200]}); "
                              "download it again or convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state dict (names -> tensors); is this a BLIP-2 checkpoint file?")
    for name, tensor in state.items():
        yield name, tensor, lambda: None


# ---- the special cases -----------------------------------------------------------------------------------


def _tie_t5_head(filled: dict):
    """Files written by transformers 5 store no T5 `lm_head` (they tie it to `shared`); published Flan-T5 files
    store their own. Either way blip2_mini's head is a module of its own: here it shares the `shared` tensor."""
    if "language_model.shared.weight" in filled:
        filled["language_model.lm_head.weight"] = filled["language_model.shared.weight"]


def _special_case(name: str, tensor: torch.Tensor):
    """Tensors that are not a plain rename: return a list of (our name, tensor), or None if not special."""
    m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", name)
    if m:  # fused [q_bias, 0, v_bias] -> two vectors; a non-zero k part cannot be represented, so refuse it
        q, k, v = tensor.chunk(3)
        if bool(k.ne(0).any()):
            raise CheckpointError(f"{name}: the k part of the fused qkv bias is not zero; the EVA ViT has no "
                                  "k bias, so this is not a BLIP-2 vision encoder checkpoint")
        prefix = f"vision_model.layers.{m.group(1)}.attn."
        return [(prefix + "q_bias", q), (prefix + "v_bias", v)]
    m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q_bias|v_bias)$", name)
    if m:  # the original LAVIS form keeps the two biases separate
        return [(f"vision_model.layers.{m.group(1)}.attn.{m.group(2)}", tensor)]
    return None


# ---- loading ---------------------------------------------------------------------------------------------


def build_skeleton(config: Blip2Config) -> Blip2:
    """The model with every parameter on the `meta` device: names and shapes, no memory, no values. The
    initialisers (`nn.init.*`, called by nn.Linear, nn.Embedding, ... in their constructors) are switched off
    while it is built: their random values would be overwritten anyway, and on meta tensors `normal_` takes a
    slow path that imports torch's compiler (~3 s, most of the time an fp32 load takes)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]  # normal_, uniform_, ...
    originals = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return Blip2(config)
    finally:
        for n, f in originals.items():
            setattr(nn.init, n, f)


def target_dtype(name: str, dtype: torch.dtype, dtype_policy: dict | None) -> torch.dtype:
    """The dtype parameter `name` is stored in: an explicit `dtype_policy` entry ({"vision_model": bf16, ...},
    longest matching prefix wins), else fp32 for the KEEP_FP32 stages when `dtype` is float16, else `dtype`."""
    if dtype_policy:
        matches = [p for p in dtype_policy if name == p or name.startswith(p.rstrip(".") + ".")]
        if matches:
            return dtype_policy[max(matches, key=len)]
    if dtype == torch.float16:
        for keep in KEEP_FP32:
            if re.match(re.escape(keep).replace(r"\*", r"\d+"), name):
                return torch.float32
    return dtype


QUANTIZE_MODES = {"int8": "float", "int8-dynamic": "int8"}  # load(quantize=...) -> quantize.py's `activations`
QUANTIZED = object()  # stands in `filled` for a tensor that went into an Int8Linear


class _QuantizeWhileLoading:
    """load_model(quantize=...): the language model's Linear layers become Int8Linear as they are read, the
    same modules that quantize_language_model would make. Each weight is rounded to int8 when it is read and
    its module is built as soon as its bias is there too (the official files list `.bias` before `.weight`;
    layers stacked into one matrix, such as q, k and v, once all of them are there), so neither the float
    language model nor two copies of its int8 matrices (ours, and fbgemm's packed one) ever exist at once:
    peak memory stays at about the int8 model's size.

    On x86 CPUs building the module is fbgemm's repacking of q (linear_prepack), which runs on one core: two
    thirds of the loading time (per 10240 x 2560 matrix ~200 ms, against ~60 ms to round it). It
    runs in a pool of threads (PyTorch releases Python's lock inside it), one per core, while this thread
    reads and rounds the next weights: measured on 8 such matrices, 2 cores, 2.75 s -> 1.56 s; loading
    blip2-opt-2.7b's shape with quantize="int8-dynamic", 27.7-28.3 s -> 21.7-25.9 s, peak RSS 4.15-4.28 ->
    3.86-3.87 GB."""

    def __init__(self, model: Blip2, mode: str):
        self.activations = QUANTIZE_MODES[mode]
        params = dict(model.named_parameters())
        self.modules = [f"language_model.{name}" for name, _ in linears_to_quantize(model.language_model)]
        self.parts = {f"{m}.{p}": m for m in self.modules for p in ("weight", "bias") if f"{m}.{p}" in params}
        self.pending: dict[str, dict] = {}  # module name -> {"weight": (q, scales), "bias": tensor} read so far
        # layers that read the same x (q, k, v; wi_0, wi_1) become one matrix (quantize.fused_projections), built
        # once all of them are read
        self.fused = {f"language_model.{fused}": [f"language_model.{p}" for p in parts]
                      for fused, parts in fused_projections(model.language_model).items()}
        self.fused_into = {part: fused for fused, parts in self.fused.items() for part in parts}
        self.stacking: dict[str, dict] = {}  # fused name -> {part: (q, scales, bias)} read so far
        self.built: dict[str, Int8Linear | Future] = {}
        self.workers = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(self.workers) if packs_for_fbgemm(torch.device("cpu")) else None
        self.in_flight: list[Future] = []  # submitted to the pool, oldest first

    def add(self, name: str, tensor: torch.Tensor):
        module = self.parts[name]
        read = self.pending.setdefault(module, {})
        read[name.rpartition(".")[2]] = quantize_weight(tensor) if name.endswith(".weight") else tensor
        if len(read) == sum(part == module for part in self.parts.values()):  # weight (and bias) all read
            (q, scale), bias = read["weight"], read.get("bias")
            del self.pending[module]
            fused = self.fused_into.get(module)
            if fused is None:
                self._build(module, Int8Linear, q, scale, bias, self.activations)
                return
            stack = self.stacking.setdefault(fused, {})
            stack[module] = (q, scale, bias)
            if len(stack) == len(self.fused[fused]):
                del self.stacking[fused]
                self._build(fused, Int8Linear.stacked, [stack[p] for p in self.fused[fused]], self.activations)

    def _build(self, module: str, make, *args):
        if self.pool is None:
            self.built[module] = make(*args)
        else:
            self.built[module] = self.pool.submit(make, *args)
            self.in_flight.append(self.built[module])
            if len(self.in_flight) > 2 * self.workers:  # the reading must not run far ahead: each queued
                self.in_flight.pop(0).result()          # matrix is memory (unbounded: +0.5 GB peak, measured)

    def install(self, model: Blip2):
        for fused, parts in self.fused.items():  # as quantize_language_model leaves them: the parts gone
            for part in parts:
                replace_module(model, part, None)
        for module, int8 in self.built.items():
            replace_module(model, module, int8.result() if isinstance(int8, Future) else int8)
        if self.pool is not None:  # (after a failed load, the pool's threads end when it is garbage-collected)
            self.pool.shutdown()
            _return_freed_memory()  # what the pool's threads freed after the last file's trim


def auto_dtype(device="cpu") -> tuple[torch.dtype, dict | None]:
    """(dtype, dtype_policy) that fit the hardware, for load(..., dtype=..., dtype_policy=...) and the command
    line's `--dtype auto`. A GPU: bf16 everywhere (fp16 where bf16 is not supported). A CPU that multiplies
    bf16 natively: the ViT and the language model in bf16 (the prompt pass is compute-bound; decoding reads
    half of fp32's bytes), and the small Q-Former in fp32, as the paper keeps it (blip2-opt-2.7b's shape,
    2 threads, all in bf16: caption 5.7 s instead of 8.6 s in fp32, benchmarks/RESULTS.md). Any other CPU:
    fp32, which it computes fastest. Fewer bytes per weight for decoding is quantization (load(quantize=...)),
    which changes the numbers a little, so it is left to the caller."""
    device = torch.device(device)
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
    if device.type == "cpu" and cpu_multiplies_bf16_faster():
        return torch.float32, {"vision_model": torch.bfloat16, "language_model": torch.bfloat16}
    return torch.float32, None


PREPACKED_STAGES = ("vision_model.", "language_model.")  # load(..., prepack=True) packs the Linear layers in these


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu", dtype_policy: dict | None = None,
               progress: bool = True, quantize: str | None = None, prepack: bool = False) -> Blip2:
    """Build a Blip2 from a checkpoint directory. See `load` for the arguments."""
    dtype, dtype_policy, device = _checked_options(dtype, dtype_policy, device, quantize, prepack)
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such directory; download a checkpoint (see weights/README.md)")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: is a file; pass the checkpoint *directory* (the one with config.json)")
    try:
        config = Blip2Config.from_json_file(directory / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = weight_files(directory)
    try:
        model = build_skeleton(config)
    except ValueError as e:  # sizes the modules refuse (heads that do not divide the width, ...)
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
    expected = dict(model.named_parameters())
    for prefix in dtype_policy or {}:
        if not any(name == prefix or name.startswith(prefix.rstrip(".") + ".") for name in expected):
            raise ValueError(f"dtype_policy: {prefix!r} matches no parameter; use blip2_mini's stage names "
                             "(vision_model, query_tokens, qformer, language_projection, language_model) or "
                             "longer prefixes of model.named_parameters()")
    int8, after_head = None, []
    mapped = {}  # our name -> release() of a weight still read from the file (prepack)
    if quantize is not None:
        if model.language_model is None:
            raise CheckpointError(f"{directory}: quantize={quantize!r}: this checkpoint has no language model")
        int8 = _QuantizeWhileLoading(model, quantize)
    filled: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    total_bytes = sum(f.stat().st_size for f in files)
    read_bytes, start = 0, time.time()

    for file in files:
        for name, tensor, release in iter_tensors(file):
            if SKIPPED.match(name) or (name == OPT_TIED_HEAD and config.use_decoder_only_language_model
                                       and config.text_config.tie_word_embeddings):
                continue
            renamed = _special_case(name, tensor)
            if renamed is None:
                renamed = [(official_to_ours(name), tensor)]
            if not renamed or any(ours not in expected for ours, _ in renamed):
                unexpected.append(name)
                continue
            for ours, t in renamed:
                if not t.is_floating_point() or t.layout != torch.strided:  # every parameter is a dense float
                    kind = t.dtype if t.layout == torch.strided else t.layout
                    mismatched.append(f"{name}: stored as {kind}, expected a dense float tensor")
                    filled[ours] = None
                elif tuple(t.shape) != tuple(expected[ours].shape):
                    mismatched.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(expected[ours].shape)}")
                    filled[ours] = None  # reported as a mismatch, not also as missing
                elif ours in filled:
                    unexpected.append(f"{name} (a second tensor for {ours})")
                elif int8 is not None and ours in int8.parts:
                    int8.add(ours, t)
                    filled[ours] = QUANTIZED
                else:
                    filled[ours] = t.to(device=device, dtype=target_dtype(ours, dtype, dtype_policy))
            if not any(filled.get(ours) is t for ours, t in renamed):  # copied (cast or moved): free the file's pages
                release()
            elif int8 is not None and name.startswith("language_model."):
                after_head.append(release)  # mapped, but read once by store_head_in_fp16 below
            elif prepack:
                mapped.update((ours, release) for ours, t in renamed if filled.get(ours) is t)
        read_bytes += file.stat().st_size
        if int8 is not None:
            _return_freed_memory()
        if progress:
            _report_progress(directory.name, read_bytes, total_bytes, start)

    if model.is_encoder_decoder and "language_model.lm_head.weight" not in filled:
        _tie_t5_head(filled)
    missing = [name for name in expected if name not in filled]
    filled = {name: t for name, t in filled.items() if t is not None}
    if missing or unexpected or mismatched:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                problems.append(f"{len(items)} {label} ({'; '.join(items[:4])}{', ...' if len(items) > 4 else ''})")
        raise CheckpointError(f"{directory}: checkpoint does not match its config.json: " + ", ".join(problems))

    for name, tensor in filled.items():  # swap each meta parameter for its loaded tensor
        if tensor is QUANTIZED:
            continue
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)
    if int8 is not None:  # as quantize_language_model leaves it: int8 Linears, the rest fp32, the head fp16
        int8.install(model)
        store_head_in_fp16(model.language_model.float())
        for release in after_head:  # the fp32 table's pages, read for the fp16 head, are not needed any more;
            release()               # other mapped tensors are simply read again from the file when used
    del filled  # the model holds the tensors now: packing one may then free its plain copy
    if prepack:  # the Linear layers of the two large stages (98 % of the weights; the Q-Former and projections
        # stay plain) copied into oneDNN's layout, one at a time
        def packed(name):
            mapped.pop(f"{name}.weight", lambda: None)()  # a weight still read from the file: its pages back
            _return_freed_memory()  # a cast copy: freed into a hole of the heap, which stays counted until
            # returned (measured: +0.6-0.9 GB at the peak for a bf16 ViT; each call takes well under 1 ms)

        cpu_prepack(model, PREPACKED_STAGES, after_each=packed)
    return model.eval()


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _checked_options(dtype, dtype_policy, device, quantize, prepack):
    """The options of load_model, checked before anything is read: (dtype, dtype_policy, torch.device), with
    dtype names ("bfloat16", as transformers accepts them) turned into torch dtypes; else one ValueError."""
    def float_dtype(value, what):
        named = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
        if named not in FLOAT_DTYPES:
            hint = '; for int8 weights use quantize="int8"' if named in (torch.int8, torch.uint8) else ""
            raise ValueError(f"{what} must be a float dtype (torch.float32, torch.bfloat16, torch.float16), "
                             f"got {value!r}{hint}")
        return named

    dtype = float_dtype(dtype, "dtype")
    if dtype_policy is not None:
        if not isinstance(dtype_policy, dict) or not all(isinstance(k, str) for k in dtype_policy):
            raise ValueError(f"dtype_policy must be a dict {{stage name: dtype}}, e.g. "
                             f"{{'vision_model': torch.bfloat16}}; got {dtype_policy!r}")
        dtype_policy = {k: float_dtype(v, f"dtype_policy[{k!r}]") for k, v in dtype_policy.items()}
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA device here (torch.cuda.is_available() is False); use 'cpu'")
    if quantize is not None and (not isinstance(quantize, str) or quantize not in QUANTIZE_MODES):
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)} or None, got {quantize!r}")
    if quantize is not None and device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} is for CPUs (int8 kernels); on {device} use dtype=torch.bfloat16")
    if prepack and device.type != "cpu":
        raise ValueError(f"prepack=True is for CPUs (oneDNN's weight layout); on {device} leave it False")
    return dtype, dtype_policy, device


def _return_freed_memory():
    """Hand memory that was freed back to the OS (glibc's malloc_trim; elsewhere nothing). Quantizing while
    loading allocates and frees many block-sized temporaries between long-lived int8 matrices; the holes they
    leave stay counted in the process's memory (measured: 1.4 GB of 6.5 GB for blip2-opt-2.7b) unless returned."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


def _report_progress(name, done, total, start):
    width, frac = 30, done / max(total, 1)
    bar = "#" * int(width * frac) + "." * (width - int(width * frac))
    end = "\n" if done >= total else ""
    print(f"\rloading {name} [{bar}] {done / 1e9:.2f}/{total / 1e9:.2f} GB {time.time() - start:.0f}s",
          end=end, file=sys.stderr, flush=True)


def load(path, dtype: torch.dtype = torch.float32, device="cpu", dtype_policy: dict | None = None,
         progress: bool = True, quantize: str | None = None, prepack: bool = False):
    """Load an official BLIP-2 checkpoint directory: returns (model, processor).

    dtype         the dtype of the weights in memory: torch.float32, bfloat16 or float16 (or its name, "bfloat16",
                  as transformers accepts it). With float16 the Q-Former and Flan-T5's FFN output projections
                  stay fp32, as in the reference; Flan-T5 in float16 is still not safe (it was trained in bf16):
                  prefer bfloat16 for it.
    device        any torch device; tensors are read straight onto it.
    dtype_policy  per-stage dtypes by name prefix, e.g. {"vision_model": torch.bfloat16, "qformer":
                  torch.float32, "language_model": torch.bfloat16}; overrides `dtype` where it matches.
    progress      show a progress bar on stderr while reading the weights.
    quantize      "int8" or "int8-dynamic": the language model's Linear layers are rounded to int8 while they
                  are read (blip2_mini/quantize.py; "int8-dynamic" also rounds their inputs, faster on x86
                  CPUs). The same model as quantize_language_model(load_model(path)), without ever holding the
                  float language model. CPU only.
    prepack       CPU inference: the float Linear layers keep their weights in oneDNN's blocked layout
                  (cpu.PackedLinear): the same numbers, faster (blip2-opt-2.7b's shape, Intel Xeon, 2 threads:
                  the ViT 0.83x the time in bf16; an fp32 5-beam step 1.28x a greedy one instead of 1.69x;
                  benchmarks/RESULTS.md). Loading takes longer (each weight is copied once: fp32 6.7 s instead
                  of 0.15 s, bf16 5.0 vs 3.2 s) and the packed weights are not parameters.
    """
    from .processing import Blip2Processor  # here, not at the top: the processor is not needed for load_model

    model = load_model(path, dtype=dtype, device=device, dtype_policy=dtype_policy, progress=progress,
                       quantize=quantize, prepack=prepack)
    processor = Blip2Processor.from_pretrained(path)
    _check_processor_fits(model.config, processor, Path(path))
    return model, processor


def _check_processor_fits(config: Blip2Config, processor, directory: Path):
    """The processor files and config.json of one directory must describe one model: a tokenizer copied from
    another model gives ids beyond the embedding table (an IndexError deep in the model, or garbage text), and
    a different slot count makes every prompt fail in the projection."""
    slots = processor.num_query_tokens
    if slots is not None and slots != config.num_query_tokens:
        raise CheckpointError(f"{directory}: processor_config.json says {slots} image slots, config.json "
                              f"{config.num_query_tokens} queries; the files come from different checkpoints")
    if slots is not None and config.image_token_index is None:  # the slots would be read as text
        raise CheckpointError(f"{directory}: processor_config.json writes {slots} <image> slots but config.json has "
                              f"no image_token_index; add \"image_token_index\": {processor.image_token_id} to it")
    if config.text_config is not None:
        rows, tokens = config.text_config.vocab_size, len(processor.tokenizer)
        if tokens > rows + 1:  # + 1: the processor's own <image> token may sit just past the table (never embedded)
            raise CheckpointError(f"{directory}: the tokenizer has {tokens} tokens but the language model's "
                                  f"embedding has {rows} rows; the tokenizer files belong to another model")
