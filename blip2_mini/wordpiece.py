"""The Q-Former's text tokenizer: BERT's uncased WordPiece (Devlin et al., 2019; Wu et al., 2016).

The BLIP-2 Q-Former is initialised from BERT-base and reads text (for image-text matching, contrastive learning
and caption generation, paper section 3.1) through BERT's tokenizer. It works in four steps:

1. Normalize: drop control characters, turn every whitespace into a space, put spaces around CJK ideographs
   (so each becomes its own word), strip accents (decompose to NFD, drop the combining marks), lower-case.
2. Pre-tokenize: split on whitespace, and cut every punctuation character out as its own word.
3. WordPiece: cut each word greedily into the longest vocabulary entries from the left; pieces after the first
   carry a "##" prefix ("playing" -> "play", "##ing"). A word that cannot be cut, or is longer than 100
   characters, becomes [UNK] as a whole.
4. Wrap the sequence as [CLS] ... [SEP].

What is unusual: the reference decides "control character", "punctuation" and "combining mark" with Unicode
tables older than Python's `unicodedata`; `_ReferenceUnicode` below lists where they differ, so that the ids
match for every assigned character. And the normalization runs on the text between added tokens only: "[SEP]"
and "[MASK]" are recognised before lower-casing, "[sep]" is plain text.
"""

import unicodedata
from bisect import bisect_right

from .tokenizer import CLEANUP_REPLACEMENTS, WHITE_SPACE, Tokenizer, clean_up_tokenization, read_tokenizer_files


def _ranges(spec: str) -> tuple[list[int], list[int]]:
    """'0898-089F 08CA' -> sorted range starts and ends, for `_in_ranges`."""
    starts, ends = [], []
    for item in spec.split():
        first, _, last = item.partition("-")
        starts.append(int(first, 16))
        ends.append(int(last or first, 16))
    return starts, ends


def _in_ranges(ch: str, ranges: tuple[list[int], list[int]]) -> bool:
    starts, ends = ranges
    k = bisect_right(starts, ord(ch)) - 1
    return k >= 0 and ord(ch) <= ends[k]


class _ReferenceUnicode:
    """The reference's character classes. Its Unicode data (Rust crates `unicode_categories` and
    `unicode-normalization`) is older than Python 3.11's `unicodedata` (Unicode 14.0); the lists below are where the
    two differ, found by running both over every code point (tests/test_tokenizers.py checks them with --live)."""

    # Characters Python calls Mn (nonspacing mark) that the reference does not strip as accents, and the reverse.
    not_nonspacing = _ranges(
        "07FD 0898-089F 08CA-08E1 09FE 0AFA-0AFF 0B55 0C04 0C3C 0D00 0D3B-0D3C 0D81 0EBA 180F 1885-1886 1ABF-1ACE "
        "1DF6-1DFB A82C A8C5 A8FF A9BD 10D24-10D27 10EAB-10EAC 10F46-10F50 10F82-10F85 11070 11073-11074 110C2 111C9 "
        "111CF 1123E 1133B 11438-1143F 11442-11444 11446 1145E 1182F-11837 11839-1183A 1193B-1193C 1193E 11943 "
        "119D4-119D7 119DA-119DB 119E0 11A01-11A0A 11A33-11A38 11A3B-11A3E 11A47 11A51-11A56 11A59-11A5B 11A8A-11A96 "
        "11A98-11A99 11C30-11C36 11C38-11C3D 11C3F 11C92-11CA7 11CAA-11CB0 11CB2-11CB3 11CB5-11CB6 11D31-11D36 11D3A "
        "11D3C-11D3D 11D3F-11D45 11D47 11D90-11D91 11D95 11D97 11EF3-11EF4 16F4F 16FE4 1CF00-1CF2D 1CF30-1CF46 "
        "1E000-1E006 1E008-1E018 1E01B-1E021 1E023-1E024 1E026-1E02A 1E130-1E136 1E2AE 1E2EC-1E2EF 1E944-1E94A"
    )
    extra_nonspacing = _ranges("1734")
    # Characters Python calls punctuation (P*) that the reference does not, and the reverse.
    not_punctuation = _ranges(
        "061D 09FD 0A76 0C77 0C84 1B7D-1B7E 2E43-2E4F 2E52-2E5D 10EAD 10F55-10F59 10F86-10F89 1144B-1144F 1145A-1145B "
        "1145D 11660-1166C 116B9 1183B 11944-11946 119E2 11A3F-11A46 11A9A-11A9C 11A9E-11AA2 11C41-11C45 11C70-11C71 "
        "11EF7-11EF8 11FFF 12FF1-12FF2 16E97-16E9A 16FE2 1E95E-1E95F"
    )
    extra_punctuation = _ranges("166D 111C9")
    # Format characters (Cf) the reference does not know, so does not remove as control characters.
    not_format = _ranges("0890-0891 08E2 110CD 13430-13438")
    # The one character whose decomposition (Unicode 13) the reference's NFD lacks: DIVES AKURU VOWEL SIGN O.
    not_decomposed = "\U00011938"

    @classmethod
    def nfd(cls, text: str) -> str:
        # Splitting at the character is safe: it is a starter, which canonical reordering never moves across.
        return cls.not_decomposed.join(unicodedata.normalize("NFD", part) for part in text.split(cls.not_decomposed))

    @classmethod
    def is_nonspacing_mark(cls, ch: str) -> bool:
        if unicodedata.category(ch) == "Mn":
            return not _in_ranges(ch, cls.not_nonspacing)
        return _in_ranges(ch, cls.extra_nonspacing)

    @classmethod
    def is_punctuation(cls, ch: str) -> bool:
        if ch.isascii():  # ASCII symbols such as $ + < = > ^ ` | ~ count as punctuation too
            return not ch.isalnum() and 33 <= ord(ch) <= 126
        if unicodedata.category(ch).startswith("P"):
            return not _in_ranges(ch, cls.not_punctuation)
        return _in_ranges(ch, cls.extra_punctuation)

    @classmethod
    def is_control(cls, ch: str) -> bool:
        """Control, format, private-use and surrogate characters; tab, newline and carriage return excepted."""
        category = unicodedata.category(ch)
        if category == "Cf":
            return not _in_ranges(ch, cls.not_format)
        return category in ("Cc", "Co", "Cs") and ch not in "\t\n\r"


def is_cjk_ideograph(ch: str) -> bool:
    """The CJK Unified / Compatibility Ideograph blocks (not Hiragana, Katakana or Hangul)."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B920 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece tokenizer (the reference's `BertTokenizer`)."""

    default_special_tokens = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    max_input_chars_per_word = 100
    continuing_subword_prefix = "##"

    def __init__(
        self,
        vocab: dict[str, int],
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        **kwargs,
    ):
        self.do_lower_case = do_lower_case
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents  # BERT: uncased strips
        self.tokenize_chinese_chars = tokenize_chinese_chars
        super().__init__(vocab, **kwargs)

    def normalize(self, text: str) -> str:
        chars = []
        for ch in text:
            if ch in "\x00\ufffd" or _ReferenceUnicode.is_control(ch):
                continue
            if ch in WHITE_SPACE:
                chars.append(" ")
            elif self.tokenize_chinese_chars and is_cjk_ideograph(ch):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        text = "".join(chars)
        if self.strip_accents:
            text = "".join(ch for ch in _ReferenceUnicode.nfd(text) if not _ReferenceUnicode.is_nonspacing_mark(ch))
        if self.do_lower_case:
            # Character by character: `str.lower()` would turn a word-final Σ into ς, which the reference does not.
            text = "".join(ch.lower() for ch in text)
        return text

    def pre_tokenize(self, text: str) -> list[str]:
        words, current = [], []
        for ch in text:
            if ch in WHITE_SPACE or _ReferenceUnicode.is_punctuation(ch):
                if current:
                    words.append("".join(current))
                    current = []
                if ch not in WHITE_SPACE:
                    words.append(ch)
            else:
                current.append(ch)
        if current:
            words.append("".join(current))
        return words

    def tokenize_word(self, word: str) -> list[str]:
        unk = self.special_tokens.get("unk_token")
        if len(word) > self.max_input_chars_per_word:
            return [unk]
        pieces, start = [], 0
        while start < len(word):
            # The longest vocabulary entry starting at `start` (with "##" when inside the word).
            prefix = self.continuing_subword_prefix if start > 0 else ""
            end = next((e for e in range(len(word), start, -1) if prefix + word[start:e] in self.vocab), None)
            if end is None:
                return [unk]
            pieces.append(prefix + word[start:end])
            start = end
        return pieces

    def _with_special_tokens(self, ids: list[int]) -> list[int]:
        cls_id = self.convert_tokens_to_ids(self.special_tokens.get("cls_token", "[CLS]"))
        sep_id = self.convert_tokens_to_ids(self.special_tokens.get("sep_token", "[SEP]"))
        return [cls_id, *ids, sep_id]

    def decode_tokens(self, tokens: list[str]) -> str:
        words = []
        for i, token in enumerate(tokens):
            if i > 0:
                prefix = self.continuing_subword_prefix
                token = token[len(prefix) :] if token.startswith(prefix) else " " + token
            # The reference cleans each token on its own (after the joining space is added), with one extra rule.
            words.append(clean_up_tokenization(token, CLEANUP_REPLACEMENTS + [(" do not", " don't")]))
        return "".join(words)

    @classmethod
    def from_pretrained(cls, directory) -> "WordPieceTokenizer":
        """Read tokenizer.json (as `save_pretrained` writes it) or vocab.txt (as BERT publishes it)."""
        files = read_tokenizer_files(directory)
        model = (files.tokenizer_json or {}).get("model", {})
        if model.get("type") == "WordPiece":
            vocab = model["vocab"]
        else:
            vocab = read_vocab_txt(files.require("vocab.txt"))
        config = files.config
        return cls(
            vocab,
            do_lower_case=config.get("do_lower_case", True),
            strip_accents=config.get("strip_accents"),
            tokenize_chinese_chars=config.get("tokenize_chinese_chars", True),
            special_tokens=files.special_tokens(**cls.default_special_tokens),
            **files.common_kwargs(),
        )


def read_vocab_txt(path: str) -> dict[str, int]:
    """One token per line, the id being the line number (trailing whitespace trimmed, as the reference does)."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return {line.rstrip("".join(WHITE_SPACE)): i for i, line in enumerate(lines)}
