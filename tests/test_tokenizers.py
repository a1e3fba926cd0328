"""The three tokenizers (blip2_mini/bpe.py, wordpiece.py, t5_tokenizer.py) against the reference's (transformers 5.23).

Default tests read tests/fixtures/tokenizers/ (rebuild with tests/reference/build_tokenizer_fixtures.py): small
tokenizers trained and saved in the official formats by the reference libraries, and what the reference returns
for them on a stress corpus plus seeded random strings. Everything must be IDENTICAL: ids with and without
special tokens, tokens, decoded text with and without special tokens, special-token attributes, padded batches.

`pytest --live` also trains fresh tokenizers with the reference libraries and compares on the spot on the stress
corpus and 500 random strings each, checks our hand-written character classes against the reference's on
every assigned code point, and checks that the reference reads `train_bpe`'s files to the same ids as ours.
"""

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch

from blip2_mini.bpe import OPT_TOKENIZER_CONFIG, ByteLevelBPETokenizer, split_words, train_bpe
from blip2_mini.t5_tokenizer import T5Tokenizer
from blip2_mini.tokenizer import is_word_char, load_tokenizer
from blip2_mini.wordpiece import WordPieceTokenizer
from tokenizer_files import (
    STRESS_CORPUS,
    make_bert_tokenizer,
    make_opt_tokenizer,
    make_t5_tokenizer,
    random_id_sequences,
    random_texts,
    training_corpus,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizers"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())["tokenizers_compared"]
EXPECTED_CLASS = {"opt": ByteLevelBPETokenizer, "opt-vocab-files": ByteLevelBPETokenizer, "bert": WordPieceTokenizer,
                  "t5": T5Tokenizer, "t5-spiece-only": T5Tokenizer, "trained-bpe": ByteLevelBPETokenizer}  # fmt: skip


def fixture_dir(name: str, tmp_path: Path) -> Path:
    if name == "t5-spiece-only":  # not stored: it is t5/spiece.model alone
        shutil.copy(FIXTURES / "t5" / "spiece.model", tmp_path / "spiece.model")
        return tmp_path
    return FIXTURES / name


def compare_cases(ours, cases) -> list[str]:
    """Every difference between our outputs and the reference's recorded ones, one line each."""
    problems = []
    for case in cases:
        text = case["text"]
        ids = ours.encode(text)
        got = dict(
            ids=ids,
            ids_without_special=ours.encode(text, add_special_tokens=False),
            tokens=ours.tokenize(text),
            decoded=ours.decode(case["ids"], skip_special_tokens=True),
            decoded_with_special=ours.decode(case["ids"], skip_special_tokens=False),
        )
        problems += [f"{key} of {text!r}: {got[key]!r} != {case[key]!r}" for key in got if got[key] != case[key]]
    return problems


@pytest.mark.parametrize("name", REFERENCE)
def test_ids_tokens_and_decodes_match_reference(name, tmp_path):
    ours = load_tokenizer(fixture_dir(name, tmp_path))
    assert type(ours) is EXPECTED_CLASS[name]
    cases = REFERENCE[name]["cases"]
    problems = compare_cases(ours, cases)
    assert not problems, f"{len(problems)} differences on {len(cases)} texts, first ones:\n" + "\n".join(problems[:10])


def compare_decodes(ours, decodes) -> list[str]:
    problems = []
    for case in decodes:
        for key, skip in (("decoded", True), ("decoded_with_special", False)):
            got = ours.decode(case["ids"], skip_special_tokens=skip)
            if got != case[key]:
                problems.append(f"{key} of {case['ids']}: {got!r} != {case[key]!r}")
    return problems


@pytest.mark.parametrize("name", REFERENCE)
def test_decoding_random_ids_matches_reference(name, tmp_path):
    """Arbitrary id sequences, e.g. a byte-level BPE token cut in the middle of a character: the invalid UTF-8
    must become U+FFFD exactly where the reference puts it."""
    ours = load_tokenizer(fixture_dir(name, tmp_path))
    problems = compare_decodes(ours, REFERENCE[name]["random_id_decodes"])
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize("name", REFERENCE)
def test_special_token_attributes_match_reference(name, tmp_path):
    ours = load_tokenizer(fixture_dir(name, tmp_path))
    expected = REFERENCE[name]["attributes"]
    got = {key: getattr(ours, key) if key != "len" else len(ours) for key in expected}
    assert got == expected


@pytest.mark.parametrize("name", REFERENCE)
def test_padded_batches_match_reference(name, tmp_path):
    ours = load_tokenizer(fixture_dir(name, tmp_path))
    for batch in REFERENCE[name]["batches"]:
        for side in ("right", "left"):
            ours.padding_side = side
            assert ours(batch["texts"], padding=True) == batch[side]
            tensors = ours(batch["texts"], padding=True, return_tensors="pt")
            assert tensors["input_ids"].dtype == torch.long
            assert tensors["input_ids"].tolist() == batch[side]["input_ids"]
            assert tensors["attention_mask"].tolist() == batch[side]["attention_mask"]


@pytest.mark.parametrize("name", REFERENCE)
def test_adding_image_token_matches_reference(name, tmp_path):
    """Blip2Processor adds <image> (special, unnormalized) when the checkpoint's tokenizer lacks it."""
    ours = load_tokenizer(fixture_dir(name, tmp_path))
    expected = REFERENCE[name]["image_token"]
    ours.add_special_tokens(["<image>"])
    assert len(ours) == expected["len"]
    for case in expected["cases"]:
        assert ours.encode(case["text"]) == case["ids"], case["text"]
    assert ours.add_special_tokens(["<image>"]) == 0  # adding it twice changes nothing
    assert len(ours) == expected["len"]


def test_single_text_call_and_tensor_decoding():
    ours = load_tokenizer(FIXTURES / "opt")
    ids = ours.encode("a photo of")
    assert ours("a photo of") == {"input_ids": ids, "attention_mask": [1] * len(ids)}
    batch = ours("a photo of", return_tensors="pt")["input_ids"]
    assert batch.shape == (1, len(ids))
    assert ours.decode(batch[0]) == ours.decode(ids) == "a photo of"
    assert ours.batch_decode(batch) == ["a photo of"]
    assert ours.decode(ids, skip_special_tokens=False) == "</s>a photo of"
    assert ours.convert_ids_to_tokens(ours.convert_tokens_to_ids(["</s>", "Ġphoto"])) == ["</s>", "Ġphoto"]
    assert ours.convert_tokens_to_ids("no such token") == ours.unk_token_id


def test_gpt2_pre_tokenization_examples():
    """The hand-written scanner reproduces the GPT-2 regex (values checked against the reference's regex)."""
    assert split_words("I'm here") == ["I", "'m", " here"]
    assert split_words("IT'S 42km") == ["IT", "'", "S", " 42", "km"]  # contractions are lower-case only
    assert split_words(" a  dog\t\n") == [" a", " ", " dog", "\t\n"]  # a run of spaces leaves one for the word
    assert split_words("x\n\ny") == ["x", "\n", "\n", "y"]
    assert split_words("Hello, world!!") == ["Hello", ",", " world", "!!"]
    assert split_words("東京 🐶🐶") == ["東京", " 🐶🐶"]
    assert split_words("café\u00a0ok ") == ["café", "\u00a0", "ok", " "]  # NBSP is whitespace, not a space


# ----- the BPE trainer ---------------------------------------------------------------------------------------------


def test_train_bpe_reproduces_the_stored_files(tmp_path):
    """Deterministic, and the stored trained-bpe/ (which the reference's ids in the fixture were computed on)
    is what the current trainer writes."""
    train_bpe(training_corpus(), vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], out_dir=tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (FIXTURES / "trained-bpe" / name).read_text(encoding="utf-8")


def test_train_bpe_round_trips_and_learns_frequent_words(tmp_path):
    corpus = ["a woman sitting on the beach with a dog"] * 20 + ["a dog on the beach"] * 10 + ["café 東京 🙂"] * 3
    vocab, merges = train_bpe(corpus, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], out_dir=tmp_path)
    assert len(vocab) == 300 and len(merges) == 300 - 4 - 256
    assert [vocab[t] for t in ["<s>", "<pad>", "</s>", "<unk>"]] == [0, 1, 2, 3]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(OPT_TOKENIZER_CONFIG))
    ours = load_tokenizer(tmp_path)
    assert ours.tokenize(" beach with a dog") == ["Ġbeach", "Ġwith", "Ġa", "Ġdog"]
    assert ours.encode("a dog")[0] == 2  # OPT: BOS </s> first
    for text in STRESS_CORPUS + random_texts(100, seed=3):
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text  # byte level: nothing is lost


def test_train_bpe_rejects_a_vocabulary_smaller_than_the_bytes(tmp_path):
    with pytest.raises(ValueError, match="smaller than the 258 special and byte tokens"):
        train_bpe(["abc"], vocab_size=100, special_tokens=["<pad>", "</s>"], out_dir=tmp_path)


# ----- error paths -------------------------------------------------------------------------------------------------


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_tokenizer(tmp_path / "nowhere")
    assert "tokenizer directory not found" in one_line_error(excinfo)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as excinfo:
        load_tokenizer(tmp_path)
    assert "no tokenizer files" in one_line_error(excinfo)


@pytest.mark.parametrize(
    "tokenizer_class, present, missing",
    [("GPT2Tokenizer", ["vocab.json"], "merges.txt"), ("BertTokenizer", [], "vocab.txt"), ("T5Tokenizer", [], "spiece.model")],
)
def test_missing_model_file(tmp_path, tokenizer_class, present, missing):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
    for name in present:
        shutil.copy(FIXTURES / "opt" / name, tmp_path / name)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_tokenizer(tmp_path)
    assert f"missing {missing}" in one_line_error(excinfo)


def test_invalid_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": ')
    with pytest.raises(ValueError) as excinfo:
        load_tokenizer(tmp_path)
    assert "tokenizer_config.json: not valid JSON" in one_line_error(excinfo)


def test_unsupported_tokenizer_class(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ValueError) as excinfo:
        load_tokenizer(tmp_path)
    assert "unsupported tokenizer_class 'LlamaTokenizer'" in one_line_error(excinfo)


def test_padding_errors():
    ours = load_tokenizer(FIXTURES / "trained-bpe")
    with pytest.raises(ValueError) as excinfo:
        ours(["a", "a b c"], return_tensors="pt")
    assert "padding=True" in one_line_error(excinfo)
    for padding in ("max_length", "do_not_pad"):  # transformers' names: "do_not_pad" must not pad, etc.
        with pytest.raises(ValueError) as excinfo:
            ours(["a", "a b c"], padding=padding)
        assert "padding must be True, False or 'longest'" in one_line_error(excinfo)
    ours.special_tokens.pop("pad_token")
    with pytest.raises(ValueError) as excinfo:
        ours(["a", "a b c"], padding=True)
    assert "no pad token" in one_line_error(excinfo)
    # nothing to pad (one text, or texts of one length): no pad token needed
    assert ours(["a b", "a b"], padding=True, return_tensors="pt")["input_ids"].shape[0] == 2
    assert ours("a b c", padding=True)["input_ids"] == ours("a b c")["input_ids"]


# ----- live: fresh tokenizers from the reference libraries ---------------------------------------------------------

LIVE_RANDOM_TEXTS = 500


def live_reference(name: str, directory: Path):
    import transformers

    {"opt": make_opt_tokenizer, "bert": make_bert_tokenizer, "t5": make_t5_tokenizer}[name](directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def reference_cases(reference, texts) -> list[dict]:
    cases = []
    for text in texts:
        ids = reference(text)["input_ids"]
        cases.append(dict(
            text=text, ids=ids, ids_without_special=reference(text, add_special_tokens=False)["input_ids"],
            tokens=reference.tokenize(text), decoded=reference.decode(ids, skip_special_tokens=True),
            decoded_with_special=reference.decode(ids, skip_special_tokens=False),
        ))  # fmt: skip
    return cases


@pytest.mark.live
@pytest.mark.parametrize("name", ["opt", "bert", "t5"])
def test_live_matches_reference(name, tmp_path):
    reference = live_reference(name, tmp_path)
    ours = load_tokenizer(tmp_path)
    texts = STRESS_CORPUS + random_texts(LIVE_RANDOM_TEXTS, seed=20240601)
    problems = compare_cases(ours, reference_cases(reference, texts))
    print(f"{name}: {len(problems)} differences on {len(texts)} texts")
    assert not problems, "\n".join(problems[:10])
    decodes = [
        dict(ids=ids, decoded=reference.decode(ids, skip_special_tokens=True),
             decoded_with_special=reference.decode(ids, skip_special_tokens=False))
        for ids in random_id_sequences(LIVE_RANDOM_TEXTS, len(reference), seed=5)
    ]  # fmt: skip
    problems = compare_decodes(ours, decodes)
    assert not problems, "\n".join(problems[:10])
    # Published configs may ask for `clean_up_tokenization_spaces` (" ." -> "." when decoding; never for BPE).
    reference.clean_up_tokenization_spaces = ours.clean_up_tokenization_spaces = True
    for text in texts:
        ids = reference(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), text
    for side in ("right", "left"):
        reference.padding_side = ours.padding_side = side
        batch = ["a photo of", "", "x <image> </s> [SEP] y", texts[-1]]
        expected = reference(batch, padding=True)
        assert ours(batch, padding=True) == {key: expected[key] for key in ("input_ids", "attention_mask")}


@pytest.mark.live
@pytest.mark.parametrize("name", ["opt", "bert", "t5"])
def test_live_added_token_flags(name, tmp_path):
    """Added tokens with every flag (lstrip, rstrip, single_word, normalized, special), saved by the reference."""
    from tokenizers import AddedToken

    reference = live_reference(name, tmp_path)
    reference.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, special=True, normalized=False),
                          AddedToken("dog", single_word=True, special=False, normalized=True),
                          AddedToken("Beach", special=False, normalized=True),
                          AddedToken("<sep>", rstrip=True, special=False, normalized=False)])  # fmt: skip
    reference.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    texts = ["a  <mask>  b", " x<mask>y ", "  <mask><mask>  ", "dog dogs hotdog dog.", "the Beach beach BEACH",
             "a<sep>  b <sep>"] + [t + " dog <mask> Beach<sep> " for t in random_texts(100, seed=9)]  # fmt: skip
    assert not compare_cases(ours, reference_cases(reference, texts))


@pytest.mark.live
def test_live_t5_from_tokenizer_json_only(tmp_path):
    """Without spiece.model our T5 reads the vocabulary and normalizer from tokenizer.json."""
    reference = live_reference("t5", tmp_path)
    (tmp_path / "spiece.model").unlink()
    ours = load_tokenizer(tmp_path)
    texts = STRESS_CORPUS + random_texts(100, seed=7)
    assert not compare_cases(ours, reference_cases(reference, texts))


@pytest.mark.live
def test_live_reference_reads_our_trained_bpe(tmp_path):
    """The reference's GPT2Tokenizer, given our vocab.json + merges.txt, encodes exactly as we do."""
    import transformers

    train_bpe(training_corpus(), vocab_size=900, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], out_dir=tmp_path)
    options = {k: v for k, v in OPT_TOKENIZER_CONFIG.items() if k != "tokenizer_class"}  # add_bos_token, ...
    reference = transformers.GPT2Tokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"),
                                           **options)  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(OPT_TOKENIZER_CONFIG))
    ours = load_tokenizer(tmp_path)
    assert len(ours) == len(reference) == 900
    texts = STRESS_CORPUS + random_texts(LIVE_RANDOM_TEXTS, seed=11)
    problems = compare_cases(ours, reference_cases(reference, texts))
    assert not problems, "\n".join(problems[:10])


def assigned_code_points() -> list[str]:
    import unicodedata

    return [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]


@pytest.mark.live
def test_live_character_classes_on_every_code_point(tmp_path):
    """Our hand-written character classes agree with the reference's on every code point assigned in Python's
    Unicode data: GPT-2's letter / number / whitespace classes, BERT's cleaning, accent stripping,
    lower-casing and punctuation, and SentencePiece's normalization of single characters."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    from blip2_mini.t5_tokenizer import PrecompiledCharsMap, read_sentencepiece_model

    chars = assigned_code_points()
    gpt2 = pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"),
                                behavior="isolated")  # fmt: skip
    bert_norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
    bert_split = pre_tokenizers.BertPreTokenizer()
    ours_bert = WordPieceTokenizer({"[UNK]": 0})
    make_t5_tokenizer(tmp_path, spiece_only=True)
    _, charsmap = read_sentencepiece_model(str(tmp_path / "spiece.model"))
    ours_charsmap, reference_charsmap = PrecompiledCharsMap(charsmap), normalizers.Precompiled(charsmap)

    problems = []
    for ch in chars:
        for text in (f"a{ch}a", f"1{ch}1", f"!{ch}!", f" {ch}"):  # each class reveals itself in one of these
            if split_words(text) != [w for w, _ in gpt2.pre_tokenize_str(text)]:
                problems.append(f"gpt2 split {text!r}")
        text = f"a{ch}A"
        if ours_bert.normalize(text) != bert_norm.normalize_str(text):
            problems.append(f"bert normalize {text!r}")
        if ours_bert.pre_tokenize(text) != [w for w, _ in bert_split.pre_tokenize_str(text)]:
            problems.append(f"bert pre-tokenize {text!r}")
        if ours_charsmap.normalize(ch) != reference_charsmap.normalize_str(ch):
            problems.append(f"sentencepiece normalize {ch!r}")
    print(f"{len(chars)} code points, {len(problems)} differences")
    assert not problems, "\n".join(problems[:10])


@pytest.mark.live
def test_live_word_characters_on_every_code_point():
    """is_word_char decides where an added token with single_word=True may match: as the reference's `\\w` on every
    assigned code point (a word character right before the token keeps it from matching there)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel

    reference = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    reference.add_tokens([AddedToken("<m>", single_word=True)])
    token = reference.token_to_id("<m>")
    chars = assigned_code_points()
    encoded = reference.encode_batch([f"{ch}<m>" for ch in chars])
    problems = [f"U+{ord(ch):04X} {unicodedata.name(ch, '?')}: reference {token not in e.ids}, ours {is_word_char(ch)}"
                for ch, e in zip(chars, encoded) if (token not in e.ids) != is_word_char(ch)]
    print(f"{len(chars)} code points, {len(problems)} differences")
    assert not problems, "\n".join(problems[:10])
