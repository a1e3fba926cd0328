"""Generation settings shared by the fixture builder and the tests (no transformers needed here)."""

# Generation settings compared token for token (fixtures and live tests). "prompt": use the batch's prompts
# (else plain captioning); "seed": seed torch's global generator first (sampling draws from it, in the reference
# and here); the rest are generate() keyword arguments, and what a case leaves out is each generate()'s default.
GENERATION_CASES = {
    "greedy-caption": dict(prompt=False, max_new_tokens=12),
    "greedy-prompt-batch": dict(prompt=True, max_new_tokens=10),
    "greedy-min-tokens-rep-penalty": dict(prompt=True, max_new_tokens=8, min_new_tokens=5, repetition_penalty=1.4),
    "beam2-lp0": dict(prompt=True, num_beams=2, length_penalty=0.0, max_new_tokens=9),
    "beam3-lp1": dict(prompt=False, num_beams=3, length_penalty=1.0, max_new_tokens=10),
    "beam4-lp-1-nrs2": dict(prompt=True, num_beams=4, length_penalty=-1.0, num_return_sequences=2, max_new_tokens=8),
    "beam5-lp2-nrs3": dict(prompt=True, num_beams=5, length_penalty=2.0, num_return_sequences=3, max_new_tokens=7),
    # EOS ids that the random models above do emit, so that finished rows (padding) and finished beam
    # hypotheses are exercised too.
    "greedy-eos-list": dict(prompt=True, max_new_tokens=10, eos_token_id=[36, 92, 33]),
    "beam3-eos-list": dict(prompt=True, num_beams=3, max_new_tokens=10, eos_token_id=[36, 92, 33]),
    "beam4-eos-list-nrs2-lp-1": dict(prompt=False, num_beams=4, num_return_sequences=2, length_penalty=-1.0,
                                     max_new_tokens=10, eos_token_id=[50, 53, 14]),
    "beam3-early-stopping-nrs2": dict(prompt=True, num_beams=3, num_return_sequences=2, max_new_tokens=10,
                                      eos_token_id=[36, 92, 33], early_stopping=True),
    "beam3-never-stop-lp2": dict(prompt=False, num_beams=3, length_penalty=2.0, max_new_tokens=10,
                                 eos_token_id=[50, 53, 14], early_stopping="never"),
    # The defaults: 20 new tokens, the checkpoint's EOS; sampling with top_k=50 (the fixture vocabularies have 96
    # tokens and temperature 3 flattens them, so draws outside the 50 best would be likely without it).
    "greedy-defaults": dict(prompt=True),
    "sample-defaults-t3": dict(prompt=True, do_sample=True, temperature=3.0, max_new_tokens=12, seed=0),
    "sample-top-p-nrs2": dict(prompt=False, do_sample=True, top_p=0.8, num_return_sequences=2, max_new_tokens=8,
                              seed=1),
    "greedy-no-eos": dict(prompt=True, max_new_tokens=10, eos_token_id=None),
}


def split_case(case: dict) -> tuple[bool, int | None, dict]:
    """(use the batch's prompts, the seed for torch's global generator or None, generate()'s keyword arguments)."""
    kwargs = {k: v for k, v in case.items() if k not in ("prompt", "seed")}
    return case["prompt"], case.get("seed"), kwargs
