"""The fixtures' checks again on a GPU: skipped without CUDA, run wherever one is present.

Most people who run the real checkpoints do so on a GPU, in fp16 or bf16, while every other test here runs on
the CPU. On the GPU:
- fp32: every stage of every fixture against the stored reference outputs, and generate() token for token
  against the reference's (greedy, beam search, EOS lists, several return sequences), with TF32 off (with it,
  cuBLAS and cuDNN round the products' inputs to 10-bit mantissas);
- fp16 and bf16: OPT's logits within a half-precision tolerance of the fp32 reference; every generation mode
  runs on the device in both families (in fp16 the Q-Former and Flan-T5's FFN output projections stay fp32,
  as in the reference) and gives valid tokens.
"""

import pytest
import torch

from blip2_mini.loader import load_model
from stages import compare_stages, our_stages
from test_generate import cases, run_case
from test_model import FIXTURES, NAMES, load_fixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_gpu(inputs: dict) -> dict:
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.parametrize("name", NAMES)
def test_every_stage_matches_reference_on_the_gpu(name):
    inputs, reference, meta = load_fixture(name)
    model = load_model(FIXTURES / name, device="cuda", progress=False)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    ours = our_stages(model, **on_gpu(inputs), interpolate_pos_encoding=meta["interpolate_pos_encoding"])
    assert {t.device.type for t in ours.values()} == {"cuda"}
    # 1e-4 of the largest value: the GPU sums in yet another order (T5 logits moved by 2e-5 of theirs between CPUs).
    compare_stages({k: v.cpu() for k, v in ours.items()}, reference, inputs.get("attention_mask"), atol=1e-5,
                   rtol=1e-4)


@pytest.mark.parametrize("name", ["opt-base", "t5-base"])
@pytest.mark.parametrize("case_name", cases())
def test_generate_matches_reference_tokens_on_the_gpu(name, case_name):
    import hf_models_cases  # the case definitions, importable without transformers

    if "seed" in hf_models_cases.GENERATION_CASES[case_name]:
        pytest.skip("sampling: the GPU's generator draws other numbers than the CPU's the fixture was made with")
    inputs, _, meta = load_fixture(name)
    model = load_model(FIXTURES / name, device="cuda", progress=False)
    inputs = on_gpu(inputs)
    ids = run_case(model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"],
                   hf_models_cases.GENERATION_CASES[case_name])
    assert ids.device.type == "cuda" and ids.tolist() == meta["generate"][case_name]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_logits_close_to_reference_on_the_gpu(dtype):
    """As the CPU's bf16 test: 8 (bf16) or 11 (fp16) bits of mantissa, compounded over the layers."""
    inputs, reference, _ = load_fixture("opt-base")
    model = load_model(FIXTURES / "opt-base", dtype=dtype, device="cuda", progress=False)
    with torch.no_grad():
        logits = model(**on_gpu(inputs)).float().cpu()
    ref, real = reference["logits"], inputs["attention_mask"].bool()
    assert torch.isfinite(logits).all()
    assert (logits - ref)[real].abs().max() < 0.05 * ref.abs().max()
    assert (logits.argmax(-1) == ref.argmax(-1))[real].float().mean() > 0.8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["opt-base", "t5-base"])
def test_every_generation_mode_runs_in_half_precision_on_the_gpu(name, dtype):
    inputs, _, _ = load_fixture(name)
    model = load_model(FIXTURES / name, dtype=dtype, device="cuda", progress=False)
    inputs = on_gpu(inputs)
    pixel_values, input_ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    vocab = model.config.text_config.vocab_size
    runs = {"greedy": dict(), "beams": dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
            "sampling": dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                             generator=torch.Generator("cuda").manual_seed(0)),
            "repetition penalty": dict(repetition_penalty=1.3, min_new_tokens=4)}
    for label, options in runs.items():
        ids = model.generate(pixel_values, input_ids, mask, max_new_tokens=6, **options)
        rows = pixel_values.shape[0] * options.get("num_return_sequences", 1)
        assert ids.device.type == "cuda" and ids.dtype == torch.long, label
        assert ids.shape[0] == rows and 0 < ids.shape[1] <= 6, label
        assert ((ids >= 0) & (ids < vocab)).all(), label
