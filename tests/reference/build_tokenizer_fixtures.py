"""Rebuild tests/fixtures/tokenizers/: small tokenizers in the official formats and the reference's ids for them.

    pip install -r tests/reference/requirements.txt
    python tests/reference/build_tokenizer_fixtures.py

Writes tests/fixtures/tokenizers/:
    <name>/            a tokenizer directory per entry of TOKENIZERS, trained and saved by the reference
                       (tokenizer_files.py), plus trained-bpe/: blip2_mini's own `train_bpe` output.
                       t5-spiece-only is not stored: it is t5/spiece.model alone (tests copy it)
    reference.json     for every directory, what the reference (loaded from that directory with AutoTokenizer,
                       or T5Tokenizer where there is no tokenizer_config.json) returns on STRESS_CORPUS and on
                       seeded random strings: ids with and without special tokens, tokens, decodes with and
                       without special tokens; decodes of random id sequences (for byte-level BPE mostly
                       invalid UTF-8); its special-token attributes; padded batches (left and right);
                       and ids after adding <image> as Blip2Processor does.
"""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken  # noqa: E402
from tokenizer_files import (  # noqa: E402
    STRESS_CORPUS,
    make_bert_tokenizer,
    make_opt_tokenizer,
    make_t5_tokenizer,
    random_id_sequences,
    random_texts,
    training_corpus,
)

from blip2_mini.bpe import OPT_TOKENIZER_CONFIG, train_bpe  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "tokenizers"

# name: (builder, number of random strings besides STRESS_CORPUS). The live tests compare many more.
TOKENIZERS = {
    "opt": (make_opt_tokenizer, 60),
    "opt-vocab-files": (lambda d: make_opt_tokenizer(d, vocab_files_only=True), 20),
    "bert": (make_bert_tokenizer, 60),
    "t5": (make_t5_tokenizer, 60),
    "t5-spiece-only": (lambda d: make_t5_tokenizer(d, spiece_only=True), 20),
    "trained-bpe": (None, 40),  # blip2_mini.bpe.train_bpe's files, read by the reference's GPT2Tokenizer
}
NOT_STORED = {"t5-spiece-only"}
RANDOM_SEED = 1234
BATCHES = [
    ["a photo of", "Question: which city is this? Answer:", ""],
    ["x", "a <image> b", "  spaces  ", "e\u0301 </s>"],
]
IMAGE_TOKEN_TEXTS = [t for t in STRESS_CORPUS if "<image>" in t] + ["<image><image>x", "a<image>b </s>"]


def train_our_bpe(out_dir: Path):
    """blip2_mini's trainer on the same corpus, made an OPT tokenizer directory, and the reference reading it."""
    train_bpe(training_corpus(), vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], out_dir=out_dir)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(OPT_TOKENIZER_CONFIG, indent=2))
    return reference_for_trained_bpe(out_dir)


def reference_for_trained_bpe(directory: Path):
    options = {k: v for k, v in OPT_TOKENIZER_CONFIG.items() if k != "tokenizer_class"}  # add_bos_token, ...
    return transformers.GPT2Tokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), **options)


def load_reference(directory: Path):
    """The reference tokenizer for a directory, as a user would load it."""
    if (directory / "tokenizer_config.json").exists():
        return transformers.AutoTokenizer.from_pretrained(directory)
    return transformers.T5Tokenizer.from_pretrained(directory)  # spiece.model alone


def record(tokenizer, texts: list[str]) -> dict:
    """Everything the tests compare, as the reference computes it."""
    cases = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        cases.append(dict(
            text=text,
            ids=ids,
            ids_without_special=tokenizer(text, add_special_tokens=False)["input_ids"],
            tokens=tokenizer.tokenize(text),
            decoded=tokenizer.decode(ids, skip_special_tokens=True),
            decoded_with_special=tokenizer.decode(ids, skip_special_tokens=False),
        ))  # fmt: skip
    attributes = dict(
        len=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        unk_token_id=tokenizer.unk_token_id,
        padding_side=tokenizer.padding_side,
        all_special_ids=tokenizer.all_special_ids,
    )
    batches = []
    for texts_in_batch in BATCHES:
        padded = {}
        for side in ("right", "left"):
            tokenizer.padding_side = side
            encoded = tokenizer(texts_in_batch, padding=True)  # (BERT's token_type_ids: not part of our interface)
            padded[side] = {key: encoded[key] for key in ("input_ids", "attention_mask")}
        tokenizer.padding_side = attributes["padding_side"]
        batches.append(dict(texts=texts_in_batch, **padded))
    decodes = [
        dict(ids=ids, decoded=tokenizer.decode(ids, skip_special_tokens=True),
             decoded_with_special=tokenizer.decode(ids, skip_special_tokens=False))
        for ids in random_id_sequences(50, len(tokenizer), seed=RANDOM_SEED)
    ]  # fmt: skip
    # Last, as it changes the tokenizer: <image> added the way Blip2Processor adds it.
    tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    image = dict(len=len(tokenizer), cases=[dict(text=t, ids=tokenizer(t)["input_ids"]) for t in IMAGE_TOKEN_TEXTS])
    return dict(attributes=attributes, cases=cases, random_id_decodes=decodes, batches=batches, image_token=image)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    reference = dict(transformers=transformers.__version__, tokenizers=tokenizers.__version__, random_seed=RANDOM_SEED,
                     tokenizers_compared={})  # fmt: skip
    for name, (build, n_random) in TOKENIZERS.items():
        directory = OUT / name
        if build is None:
            tokenizer = train_our_bpe(directory)
        else:
            build(directory)
            tokenizer = load_reference(directory)
        texts = STRESS_CORPUS + random_texts(n_random, seed=RANDOM_SEED)
        reference["tokenizers_compared"][name] = record(tokenizer, texts)
        print(f"{name}: {len(texts)} texts, vocabulary {len(tokenizer)}, files {sorted(p.name for p in directory.iterdir())}")
        if name in NOT_STORED:
            shutil.rmtree(directory)
    (OUT / "reference.json").write_text(dump(reference))


def dump(value, indent: str = "") -> str:
    """JSON with one line per innermost record (a case, a batch), so that a rebuild gives a readable diff."""
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) and v and not _is_leaf(v) for v in value.values()):
        inner = indent + " "
        items = [f"{inner}{json.dumps(k)}: {dump(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        inner = indent + " "
        return "[\n" + ",\n".join(inner + dump(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def _is_leaf(value) -> bool:
    """A record printed on one line: a dict or list holding no dicts."""
    items = value.values() if isinstance(value, dict) else value
    return all(not isinstance(v, dict) for v in items)


if __name__ == "__main__":
    main()
