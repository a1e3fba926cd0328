"""Live: fresh random BLIP-2 models (OPT and Flan-T5) built with transformers; model.generate must give the
reference's tokens for every generation case. Run with `pytest --live`."""

import pytest
import torch

pytestmark = pytest.mark.live

CONFIGS = {
    "opt-q5-heads2": ("opt", dict(num_query_tokens=5, lm_heads=2), [2, 6]),
    "opt-3layers-batch3": ("opt", dict(lm_layers=3, qformer_layers=3), [1, 4, 2]),
    "t5-heads2-dkv12": ("t5", dict(lm_heads=2, d_kv=12), [3, 1]),
    "t5-freq1-q3": ("t5", dict(cross_attention_frequency=1, num_query_tokens=3), [5, 2]),
}


@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_generate_matches_live_reference(config_id, tmp_path):
    pytest.importorskip("transformers")
    from hf_models import GENERATION_CASES, build_reference, make_config, prompt_ids, reference_generate

    from blip2_mini.loader import load_model

    family, overrides, lengths = CONFIGS[config_id]
    config = make_config(family, **overrides)
    reference = build_reference(config, seed=sum(map(ord, config_id)))
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path, progress=False)
    pixel_values = torch.randn(len(lengths), 3, 28, 28, generator=torch.Generator().manual_seed(11))
    ids, mask = prompt_ids(config, len(lengths), lengths, seed=12)
    failures = []
    for case_name, case in GENERATION_CASES.items():
        expected = reference_generate(reference, pixel_values, ids, mask, case)
        kwargs = {k: v for k, v in case.items() if k != "prompt"}
        ours = model.generate(pixel_values, ids if case["prompt"] else None, mask if case["prompt"] else None,
                              **kwargs)
        if ours.tolist() != expected.tolist():
            failures.append(f"{case_name}: ours {ours.tolist()} reference {expected.tolist()}")
    assert not failures, "\n".join(failures)
