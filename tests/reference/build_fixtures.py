"""Rebuild the model fixtures: tiny random reference checkpoints in the official layout + what each stage outputs.

    pip install -r tests/reference/requirements.txt
    python tests/reference/build_fixtures.py

Writes tests/fixtures/model/<name>/: the checkpoint exactly as the reference's `save_pretrained` writes it
(config.json, model.safetensors or shards + index), and `reference.safetensors` holding the inputs and every
stage's reference output, and `reference.json` recording the configuration and the reference version.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_models import (GENERATION_CASES, REFERENCE_VERSION, build_reference, make_config, prompt_ids,
                       reference_generate, reference_stages)

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "model"

# name: (family, config overrides, batch prompt lengths, input image size, save options)
FIXTURES = {
    "opt-base": ("opt", {}, [3, 5], 28, {}),
    "opt-odd-heads-freq3-interp": ("opt", dict(vision_width=24, vision_heads=3, lm_width=24, lm_heads=3,
                                               qformer_width=30, qformer_heads=5, qformer_layers=3,
                                               cross_attention_frequency=3, num_query_tokens=5),
                                   [4, 1], 42, dict(max_shard_size="40KB")),
    "t5-base": ("t5", dict(lm_heads=3, d_kv=10, cross_attention_frequency=1), [2, 4], 28, {}),
    "itm-base": ("itm", {}, None, 28, {}),
}


def main():
    for name, (family, overrides, lengths, size, save_options) in FIXTURES.items():
        config = make_config(family, **overrides)
        model = build_reference(config, seed=len(name))
        directory = OUT / name
        shutil.rmtree(directory, ignore_errors=True)
        model.save_pretrained(directory, **save_options)

        g = torch.Generator().manual_seed(7)
        pixel_values = torch.randn(2, 3, size, size, generator=g)
        inputs = {"pixel_values": pixel_values}
        if family in ("opt", "t5"):
            inputs["input_ids"], inputs["attention_mask"] = prompt_ids(config, 2, lengths, seed=3)
        if family == "t5":
            inputs["decoder_input_ids"] = torch.randint(2, config.text_config.vocab_size, (2, 3), generator=g)
            inputs["decoder_input_ids"][:, 0] = config.text_config.decoder_start_token_id
        interpolate = size != config.vision_config.image_size
        stages = reference_stages(model, **inputs, interpolate_pos_encoding=interpolate)
        tensors = {f"input.{k}": v.clone() for k, v in inputs.items()}
        tensors.update({f"output.{k}": v.clone() for k, v in stages.items()})
        save_file(tensors, directory / "reference.safetensors")
        generated = {}
        if family in ("opt", "t5") and not interpolate:
            for case_name, case in GENERATION_CASES.items():
                ids = reference_generate(model, pixel_values, inputs["input_ids"], inputs["attention_mask"], case)
                generated[case_name] = ids.tolist()
        (directory / "reference.json").write_text(json.dumps(
            {"family": family, "overrides": overrides, "interpolate_pos_encoding": interpolate,
             "reference": f"transformers {REFERENCE_VERSION}", "seed": len(name), "generate": generated}, indent=1))
        size_kb = sum(f.stat().st_size for f in directory.iterdir()) / 1024
        print(f"{name}: {len(stages)} stages, {size_kb:.0f} KB")


if __name__ == "__main__":
    main()
