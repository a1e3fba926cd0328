"""Reference answers of transformers' `generate` for the toy language model of tests/test_decode.py.

    pip install -r tests/reference/requirements.txt
    python tests/reference/build_decode_fixtures.py     # rewrites tests/fixtures/decode/

decode.py must give the reference's tokens without any transformers model at test time, so the default tests
run a toy model (`ToyLM`: a one-layer tanh RNN in float64, defined in tests/test_decode.py) and this script
records what the reference's decoding gives for that same toy. It wraps the toy as a minimal transformers
`PreTrainedModel` + `GenerationMixin` (`ToyForCausalLM`) whose forward recomputes the whole sequence
(`use_cache=False`): the reference then runs its own greedy / sampling / beam-search loops and its own
logits processors around our toy, which is exactly the part under test.

Writes tests/fixtures/decode/:
    toy_lm.safetensors   the toy's weights (embed (V, D), recur (D, D), head (D, V); V = 40, D = 16)
    cases.json           {"reference": versions, "cases": {name: {prompt, seed, kwargs, expected}}}: the
                         generate settings (all explicit: the reference's defaults such as top_k=50 never
                         apply), the prompts (lists of ids, left-padded by `toy_prompts`), the sampling seed
                         (the reference draws from torch's global generator seeded with it; decode.py from a
                         torch.Generator with the same seed) and the reference's new tokens.

Found while building it (transformers 5.23): beam search divides by the number of *new* tokens (the prompt
is not counted, also for decoder-only models), and pads finished beams with `pad_token_id or eos_token_id[0]`,
i.e. with EOS when the pad id is 0 (case "beam3-pad0-batch").
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # blip2_mini, and test_decode.py where the toy model lives
from test_decode import BATCH, FIXTURES, SINGLE, ToyLM, toy_prompts  # noqa: E402

EOS, PAD = 2, 1
BASE = dict(max_new_tokens=12, min_new_tokens=0, num_beams=1, length_penalty=1.0, do_sample=False,
            temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, num_return_sequences=1,
            eos_token_id=EOS, pad_token_id=PAD, early_stopping=False)

# name: (prompts, sampling seed or None, settings that differ from BASE). The "heuristic" and "p0.3" cases were
# found by search: there the beam-search stopping heuristic, and the beam-sampling rule that top-k / top-p keep
# at least n_eos + 1 tokens, change the answer.
CASES = {
    "greedy-single": (SINGLE, None, dict()),
    "greedy-batch": (BATCH, None, dict()),
    "greedy-eos-list-min3": (BATCH, None, dict(eos_token_id=[2, 7], min_new_tokens=3)),
    "greedy-rep3-batch": (BATCH, None, dict(repetition_penalty=3.0)),
    "greedy-rep0.7-min4": (BATCH, None, dict(repetition_penalty=0.7, min_new_tokens=4)),
    "greedy-no-eos": (BATCH, None, dict(eos_token_id=None, max_new_tokens=8)),
    "sample-t0.7-nrs2": (BATCH, 0, dict(do_sample=True, temperature=0.7, num_return_sequences=2)),
    "sample-k5-p0.8": (BATCH, 1, dict(do_sample=True, top_k=5, top_p=0.8, max_new_tokens=16)),
    "sample-t1.5-p0.6-rep1.2": (SINGLE, 2, dict(do_sample=True, temperature=1.5, top_p=0.6,
                                                   repetition_penalty=1.2, num_return_sequences=3)),
    "beam2-lp1-single": (SINGLE, None, dict(num_beams=2)),
    "beam3-lp1-single": (SINGLE, None, dict(num_beams=3)),
    "beam3-lp-1-nrs3-batch": (BATCH, None, dict(num_beams=3, length_penalty=-1.0, num_return_sequences=3)),
    "beam4-lp0-nrs2-batch": (BATCH, None, dict(num_beams=4, length_penalty=0.0, num_return_sequences=2)),
    "beam5-lp2-batch": (BATCH, None, dict(num_beams=5, length_penalty=2.0, max_new_tokens=16)),
    "beam3-early-true-nrs2": (BATCH, None, dict(num_beams=3, early_stopping=True, num_return_sequences=2)),
    "beam3-never-lp2": (BATCH, None, dict(num_beams=3, early_stopping="never", length_penalty=2.0)),
    "beam4-min5-rep1.3-eos-list": (BATCH, None, dict(num_beams=4, min_new_tokens=5, repetition_penalty=1.3,
                                                        eos_token_id=[2, 7])),
    "beam3-pad0-batch": (BATCH, None, dict(num_beams=3, pad_token_id=0, num_return_sequences=3)),
    "beam3-no-eos": (BATCH, None, dict(num_beams=3, eos_token_id=None, max_new_tokens=6)),
    "beam2-heuristic-batch": ([[8, 9], [22, 13, 27, 12, 11], [23, 35]], None, dict(num_beams=2)),
    "beam2-lp2-heuristic": ([[26, 36, 6, 27]], None, dict(num_beams=2, length_penalty=2.0)),
    "beam-sample4-k10-p0.3-lp1.5": ([[8], [35, 34, 9], [38, 21, 10]], 70,
                                    dict(num_beams=4, do_sample=True, top_k=10, top_p=0.3, length_penalty=1.5)),
    "beam-sample3-p0.3-lp1.5": ([[8, 27, 23, 39], [21, 14], [14, 5]], 86,
                                dict(num_beams=3, do_sample=True, top_p=0.3, length_penalty=1.5)),
    "beam-sample3-k8-t1.2": (BATCH, 3, dict(num_beams=3, do_sample=True, top_k=8, temperature=1.2,
                                              num_return_sequences=2)),
}


def toy_for_causal_lm(lm: ToyLM):
    """The toy wrapped for the reference's `generate`: every forward reruns the RNN over all ids."""
    import transformers
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class ToyConfig(transformers.PretrainedConfig):
        model_type = "toy_rnn"

    class ToyForCausalLM(transformers.PreTrainedModel, transformers.GenerationMixin):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.unused = torch.nn.Parameter(torch.zeros(1))  # a PreTrainedModel wants one parameter

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return CausalLMOutputWithPast(logits=lm(input_ids, attention_mask)[0])

    return ToyForCausalLM(ToyConfig(vocab_size=lm.head.shape[1])).eval()


@torch.no_grad()
def reference_generate(lm: ToyLM, case: dict) -> list:
    """The reference's new tokens for one stored case (prompt kind, seed, kwargs)."""
    import transformers

    ids, mask = toy_prompts(case["prompt"], case["kwargs"]["pad_token_id"])
    config = transformers.GenerationConfig(**case["kwargs"], use_cache=False, bos_token_id=None)
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    out = toy_for_causal_lm(lm).generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, ids.shape[1]:].tolist()


def main():
    import transformers

    weights = ToyLM.random_weights()
    lm = ToyLM(weights)
    cases = {}
    for name, (prompt, seed, settings) in CASES.items():
        case = {"prompt": prompt, "seed": seed, "kwargs": BASE | settings}
        case["expected"] = reference_generate(lm, case)
        assert len({t for row in case["expected"] for t in row}) >= 3, f"{name}: degenerate output"
        cases[name] = case
    FIXTURES.mkdir(parents=True, exist_ok=True)
    save_file(weights, FIXTURES / "toy_lm.safetensors")
    reference = f"transformers {transformers.__version__}, torch {torch.__version__}"
    lines = [f"  {json.dumps(name)}: {json.dumps(case)}" for name, case in cases.items()]  # one case a line
    text = f'{{"reference": {json.dumps(reference)}, "cases": {{\n' + ",\n".join(lines) + "\n}}\n"
    (FIXTURES / "cases.json").write_text(text)
    print(f"tests/fixtures/decode: {len(cases)} cases")
    for name, case in cases.items():
        print(f"  {name:30s} {case['expected']}")


if __name__ == "__main__":
    main()
