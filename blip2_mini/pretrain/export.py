"""Save a trained toy model in the official checkpoint layout: the inverse of loader.py.

The directory looks like a published one (Salesforce/blip2-opt-2.7b): config.json, model.safetensors with the
reference's tensor names, preprocessor_config.json + processor_config.json for the processor, and an OPT-style
tokenizer (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json). So `blip2_mini.load` and
`transformers`' Blip2ForConditionalGeneration / Blip2Processor read it like any official checkpoint.

Names are translated by reading loader.KEY_MAP backwards, with the loader's special cases undone:
- the ViT's `q_bias` and `v_bias` become one fused `qkv.bias` = [q_bias, zeros, v_bias] (no k bias);
- OPT's tied output head is written out as `language_model.lm_head.weight`, as published files do.

Two layouts: `save_generation_model` (stage 2, Blip2ForConditionalGeneration, no Q-Former text weights, like
the published OPT checkpoints) and `save_retrieval_model` (stage 1, Blip2ForImageTextRetrieval, with the text
side, the projections and the ITM head, like blip2-itm-vit-g).
"""

import copy
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import Blip2Config
from ..loader import KEY_MAP
from ..model import Blip2
from .common import IMAGE_MEAN, IMAGE_STD

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _compile_ours(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+|encoder|decoder)") + r"(\.weight|\.bias)?$")


_INVERSE_RULES = [(_compile_ours(ours), official) for official, ours in KEY_MAP.items()]


def ours_to_official(name: str) -> str:
    """blip2_mini's parameter name -> the official tensor name (the inverse of loader.official_to_ours)."""
    for pattern, official in _INVERSE_RULES:
        m = pattern.match(name)
        if m:
            *indices, suffix = m.groups()
            return official.format(*indices) + (suffix or "")
    raise KeyError(f"{name}: no KEY_MAP entry produces this parameter")


def official_state_dict(model: Blip2) -> dict[str, torch.Tensor]:
    """Every parameter of `model` under its official name, contiguous and detached (ready for safetensors)."""
    out = {}
    for name, tensor in model.named_parameters():
        m = re.match(r"^vision_model\.layers\.(\d+)\.attn\.(q_bias|v_bias)$", name)
        if m:
            if m.group(2) == "q_bias":  # written once, from the q half, together with v
                attn = model.vision_model.layers[int(m.group(1))].attn
                fused = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])  # (3*Dv,)
                out[f"vision_model.encoder.layers.{m.group(1)}.self_attn.qkv.bias"] = fused
            continue
        out[ours_to_official(name)] = tensor
    if model.config.use_decoder_only_language_model and model.language_model.lm_head is None:
        out["language_model.lm_head.weight"] = model.language_model.embed_tokens.weight.clone()  # tied copy
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_processor_files(out_dir: Path, config: Blip2Config):
    side = config.vision_config.image_size
    _write_json(out_dir / "preprocessor_config.json", {
        "image_processor_type": "BlipImageProcessor", "processor_class": "Blip2Processor",
        "do_convert_rgb": True, "do_resize": True, "size": {"height": side, "width": side}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD)})
    _write_json(out_dir / "processor_config.json", {"processor_class": "Blip2Processor",
                                                    "num_query_tokens": config.num_query_tokens})


def save_generation_model(model: Blip2, tokenizer_dir, out_dir, dtype=torch.float32) -> Path:
    """Write the stage-2 model (OPT family) as a Blip2ForConditionalGeneration directory. The Q-Former's text
    weights, if the model still carries them from stage 1, are dropped, as in the published OPT checkpoints."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.qformer_config.use_qformer_text_input = False
    state = {k: v.to(dtype) for k, v in official_state_dict(model).items()
             if not re.match(r"^(embeddings\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.)", k)}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config.to_dict())
    text = config.text_config
    _write_json(out_dir / "generation_config.json", {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
                                                      "pad_token_id": text.pad_token_id})
    _write_processor_files(out_dir, config)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir


def save_retrieval_model(model: Blip2, tokenizer_dir, out_dir, dtype=torch.float32) -> Path:
    """Write the stage-1 model as a Blip2ForImageTextRetrieval directory (no language model). Its tokenizer
    is the same BPE, configured to frame text as the Q-Former read it in stage 1: "<s> text </s>"."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) for k, v in official_state_dict(model).items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", model.config.to_dict())
    _write_processor_files(out_dir, model.config)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    tok_config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    tok_config.update(bos_token="<s>", add_bos_token=True, add_eos_token=True)  # [CLS] text [SEP], in BPE clothes
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    specials = json.loads((out_dir / "special_tokens_map.json").read_text())
    _write_json(out_dir / "special_tokens_map.json", {**specials, "bos_token": "<s>"})
    return out_dir
