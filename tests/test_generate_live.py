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
    from test_generate import run_case

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
        ours = run_case(model, pixel_values, ids, mask, case)
        if ours.tolist() != expected.tolist():
            failures.append(f"{case_name}: ours {ours.tolist()} reference {expected.tolist()}")
    assert not failures, "\n".join(failures)


def test_default_length_near_the_position_table_matches_live_reference(tmp_path):
    """No max_new_tokens and a prompt that leaves 7 positions: the reference stops at its table's end."""
    pytest.importorskip("transformers")
    from hf_models import build_reference, make_config, reference_generate

    from blip2_mini.loader import load_model
    from test_generate import run_case

    config = make_config("opt")
    reference = build_reference(config, seed=4)
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path, progress=False)
    Q, limit = config.num_query_tokens, config.text_config.max_position_embeddings
    g = torch.Generator().manual_seed(1)
    text = torch.randint(4, config.image_token_index - 1, (limit - 7 - Q - 1,), generator=g)
    ids = torch.tensor([[config.image_token_index] * Q + [config.text_config.bos_token_id] + text.tolist()])
    mask = torch.ones_like(ids)
    pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    case = dict(prompt=True, eos_token_id=None)
    expected = reference_generate(reference, pixel_values, ids, mask, case)
    assert expected.shape == (1, 7)
    assert run_case(model, pixel_values, ids, mask, case).tolist() == expected.tolist()


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_default_eos_is_the_checkpoints_as_in_live_reference(family, tmp_path):
    """The end token a call leaves out is config.json's text_config.eos_token_id, in the reference as here. The
    random models never emit their family's EOS, so the checkpoint declares one they do emit."""
    pytest.importorskip("transformers")
    from hf_models import build_reference, make_config, prompt_ids, reference_generate
    from transformers import Blip2ForConditionalGeneration

    from blip2_mini.loader import load_model
    from test_generate import run_case

    pixel_values = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    ids, mask = prompt_ids(make_config(family), 2, [3, 2], seed=4)
    free = reference_generate(build_reference(make_config(family), seed=5), pixel_values, ids, mask,
                              dict(prompt=True, max_new_tokens=10, eos_token_id=None))
    eos = free[0, 3].item()  # emitted at the 4th step of the first row
    build_reference(make_config(family, eos_token_id=eos), seed=5).save_pretrained(tmp_path)
    reference = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    case = dict(prompt=True, max_new_tokens=10)
    expected = reference_generate(reference, pixel_values, ids, mask, case)
    assert expected.shape[1] < 10 or expected[0, 4:].tolist() != free[0, 4:].tolist()  # it did stop at eos
    assert run_case(load_model(tmp_path, progress=False), pixel_values, ids, mask, case).tolist() == expected.tolist()
