"""Flan-T5's tokenizer: a SentencePiece unigram model (Kudo, 2018) read from `spiece.model`.

BLIP-2's Flan-T5 language models read text through T5's 32k SentencePiece vocabulary. A unigram model gives every
piece a log-probability (its score); a word is cut into the pieces whose scores sum highest, found by dynamic
programming over the word's characters (Viterbi). The pipeline, as the reference runs it:

1. Normalize with the model's own rules (`precompiled_charsmap`, NFKC-like: "ﬁ" -> "fi", "①" -> "1", full-width
   letters to ASCII, odd spaces to " ").
2. Split on whitespace and mark each word's start with "▁" (U+2581): "a dog" -> "▁a", "▁dog". Runs of spaces,
   tabs and newlines all vanish, so decoding gives single spaces back.
3. Viterbi over each word; a character no piece covers becomes `<unk>` (consecutive ones fused into one).
4. Append EOS `</s>`; T5 has no BOS. `<pad>` (id 0) doubles as the decoder's start token.
The 100 sentinel tokens `<extra_id_0>` ... `<extra_id_99>` sit at the end of the vocabulary in reverse order
(`<extra_id_0>` has the highest id) and, like `</s>`, are matched as whole tokens inside the text.

What is unusual: we do not call SentencePiece's own encoder. The reference (transformers 5.x) runs the model
through the Rust `tokenizers` pipeline, which differs from SentencePiece on special tokens inside the text and on
some normalizations; here the `sentencepiece` package only reads the model file, and the steps above are
written out to give the reference's ids.
"""

import base64
import struct
import unicodedata

from .tokenizer import WHITE_SPACE, Tokenizer, read_tokenizer_files

METASPACE = "\u2581"  # "▁": marks the start of a word
UNK_PENALTY = 10.0  # an unknown character scores this much below the worst piece (SentencePiece's kUnkPenalty)


# ----- step 1: the precompiled normalizer -------------------------------------------------------------------------


class PrecompiledCharsMap:
    """SentencePiece's normalization rules: a double-array trie from UTF-8 strings to their replacements.

    The blob is: u32 trie size in bytes | trie (u32 units) | replacement strings, each ending with a NUL byte.
    """

    def __init__(self, blob: bytes):
        (trie_size,) = struct.unpack_from("<I", blob, 0)
        self.units = struct.unpack_from(f"<{trie_size // 4}I", blob, 4)
        self.replacements = blob[4 + trie_size :]

    def lookup(self, chunk: str) -> str | None:
        """The replacement of the SHORTEST prefix of `chunk` that has one (what the reference uses), or None.

        Walking the double-array trie: each unit holds a label (the byte that leads to it), an offset to its
        children (child of node p for byte b is at p ^ offset ^ b) and a flag saying a key ends here.
        """
        units = self.units
        position = self._offset(units[0])
        for byte in chunk.encode("utf-8"):
            if byte == 0:  # the trie's keys end at NUL
                break
            position ^= byte
            if position >= len(units) or units[position] & 0x800000FF != byte:
                return None
            unit = units[position]
            position ^= self._offset(unit)
            if (unit >> 8) & 1:  # a key ends here: its value is where its replacement starts
                start = units[position] & 0x7FFFFFFF
                return self.replacements[start : self.replacements.index(b"\0", start)].decode("utf-8")
        return None

    @staticmethod
    def _offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def normalize(self, text: str) -> str:
        """Replace text grapheme by grapheme, as the reference does.

        A short grapheme (under 6 UTF-8 bytes) is looked up whole, and replaced by the replacement of its shortest
        prefix that has one, so "A" + combining circumflex becomes "Â" and, quirkily, a full-width "Ａ" followed by
        an accent becomes a bare "A". Other graphemes are replaced character by character.
        """
        out = []
        for grapheme in grapheme_clusters(text):
            if len(grapheme.encode("utf-8")) < 6:
                replacement = self.lookup(grapheme)
                if replacement is not None:
                    out.append(replacement)
                    continue
            for ch in grapheme:
                replacement = self.lookup(ch)
                out.append(ch if replacement is None else replacement)
        return "".join(out)


# Grapheme clusters (user-perceived characters, Unicode UAX #29) decide what the normalizer looks up as one unit.
# Python has no grapheme data, so the break classes are derived from the general category plus these lists.
_PREPEND = {*range(0x600, 0x606), 0x6DD, 0x70F, 0x890, 0x891, 0x8E2, 0xD4E, 0x110BD, 0x110CD, 0x111C2, 0x111C3,
            0x1193F, 0x11941, 0x11A3A, *range(0x11A84, 0x11A8A), 0x11D46, 0x11F02}  # fmt: skip
# Extend although not a mark: joiners, half-width voicing marks, emoji skin tones, tag characters.
_EXTEND = {0x200C, 0x200D, 0xFF9E, 0xFF9F, *range(0x1F3FB, 0x1F400), *range(0xE0020, 0xE0080)}
# Spacing marks that do not join (Myanmar, Tai Tham, ...), and two letters that do (Thai and Lao AM).
_NOT_SPACING_MARK = {0x102B, 0x102C, 0x1038, 0x1062, 0x1063, 0x1064, *range(0x1067, 0x106E), 0x1083,
                     *range(0x1087, 0x108D), 0x108F, 0x109A, 0x109B, 0x109C, 0x1A61, 0x1A63, 0x1A64, 0xAA7B, 0xAA7D,
                     0x11720, 0x11721}  # fmt: skip
_SPACING_LETTER = {0xE33, 0xEB3}


def _break_class(ch: str) -> str:
    cp = ord(ch)
    if ch in "\r\n":
        return ch
    if 0x1F1E6 <= cp <= 0x1F1FF:
        return "RI"  # regional indicator: flags are pairs of them
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return "L"  # Hangul leading consonant jamo
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return "V"  # vowel jamo
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return "T"  # trailing consonant jamo
    if 0xAC00 <= cp <= 0xD7A3:
        return "LV" if (cp - 0xAC00) % 28 == 0 else "LVT"  # precomposed syllables
    if cp in _PREPEND:
        return "Prepend"
    category = unicodedata.category(ch)
    if category in ("Mn", "Me") or cp in _EXTEND or cp in _SPACING_LETTER or (category == "Mc" and cp not in _NOT_SPACING_MARK):
        return "Extend"  # extends the previous cluster (Extend, ZWJ and SpacingMark in UAX #29)
    if category in ("Cc", "Cf", "Zl", "Zp", "Cs"):
        return "Control"
    return "Other"


def _joins(before: str, after: str, regional_run: int) -> bool:
    """Whether no grapheme break falls between characters of break classes `before` and `after`."""
    if (before, after) == ("\r", "\n"):
        return True
    if before in ("Control", "\r", "\n") or after in ("Control", "\r", "\n"):
        return False
    if (before == "L" and after in ("L", "V", "LV", "LVT")) or (before in ("LV", "V") and after in ("V", "T")):
        return True
    if before in ("LVT", "T") and after == "T":
        return True
    if after == "Extend" or before == "Prepend":
        return True
    return before == after == "RI" and regional_run % 2 == 1
    # (Not modelled: emoji ZWJ sequences and Indic conjuncts. Both only build clusters of 6 bytes or more, which
    # the normalizer handles character by character anyway.)


def grapheme_clusters(text: str) -> list[str]:
    clusters, regional_run, previous = [], 0, None
    for ch in text:
        cls = _break_class(ch)
        if previous is not None and _joins(previous, cls, regional_run):
            clusters[-1] += ch
        else:
            clusters.append(ch)
        regional_run = regional_run + 1 if cls == "RI" else 0
        previous = cls
    return clusters


# ----- the tokenizer -----------------------------------------------------------------------------------------------


class T5Tokenizer(Tokenizer):
    """T5 SentencePiece unigram tokenizer (the reference's `T5Tokenizer`)."""

    default_special_tokens = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>")

    def __init__(self, pieces: list[tuple[str, float]], precompiled_charsmap: bytes | None = None, extra_ids: int = 100, **kwargs):
        # The sentinels go after the SentencePiece vocabulary, <extra_id_0> last.
        known = {piece for piece, _ in pieces}
        pieces = pieces + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids)) if f"<extra_id_{i}>" not in known]
        self.scores = {piece: score for piece, score in pieces}
        self.max_piece_length = max(len(piece) for piece, _ in pieces)
        self.unk_score = min(self.scores.values()) - UNK_PENALTY
        self.charsmap = PrecompiledCharsMap(precompiled_charsmap) if precompiled_charsmap else None
        kwargs["extra_special_tokens"] = kwargs.get("extra_special_tokens") or [f"<extra_id_{i}>" for i in range(extra_ids)]
        super().__init__({piece: i for i, (piece, _) in enumerate(pieces)}, **kwargs)

    def normalize(self, text: str) -> str:
        return self.charsmap.normalize(text) if self.charsmap else text

    def pre_tokenize(self, text: str) -> list[str]:
        """Whitespace-split words, each starting with "▁"; a "▁" typed inside a word also starts a new one."""
        words = []
        for word in "".join(" " if ch in WHITE_SPACE else ch for ch in text).split(" "):
            if not word:
                continue
            if not word.startswith(METASPACE):
                word = METASPACE + word
            starts = [i for i, ch in enumerate(word) if ch == METASPACE] + [len(word)]
            words += [word[a:b] for a, b in zip(starts, starts[1:])]
        return words

    def tokenize_word(self, word: str) -> list[str]:
        """The highest-scoring cut of `word` into pieces (Viterbi); uncovered characters become unknown."""
        n = len(word)
        # best[end] = (score of the best cut of word[:end], start of its last piece, whether that piece is unknown)
        best: list[tuple[float, int, bool] | None] = [None] * (n + 1)
        best[0] = (0.0, 0, False)
        for start in range(n):
            score_here = best[start][0]
            for end in range(start + 1, min(n, start + self.max_piece_length) + 1):
                score = self.scores.get(word[start:end])
                # Ties keep the earlier candidate, as the reference does.
                if score is not None and (best[end] is None or score_here + score > best[end][0]):
                    best[end] = (score_here + score, start, False)
            if word[start] not in self.scores:  # no single-character piece: allow an unknown character
                end = start + 1
                if best[end] is None or score_here + self.unk_score > best[end][0]:
                    best[end] = (score_here + self.unk_score, start, True)
        # Walk back from the end; consecutive unknown characters become one unknown token.
        pieces, end, unknown_run = [], n, ""
        while end > 0:
            _, start, unknown = best[end]
            if unknown:
                unknown_run = word[start:end] + unknown_run
            else:
                if unknown_run:
                    pieces.append(unknown_run)
                    unknown_run = ""
                pieces.append(word[start:end])
            end = start
        if unknown_run:
            pieces.append(unknown_run)
        return pieces[::-1]  # an unknown run is not in the vocabulary: `encode` maps it to <unk>

    def _with_special_tokens(self, ids: list[int]) -> list[int]:
        return ids + [self.eos_token_id]

    def decode_tokens(self, tokens: list[str]) -> str:
        # "▁" back to spaces; in the first token the reference drops them instead (the sentence's leading space).
        return "".join(t.replace(METASPACE, "" if i == 0 else " ") for i, t in enumerate(tokens))

    @classmethod
    def from_pretrained(cls, directory) -> "T5Tokenizer":
        """Read spiece.model (with the `sentencepiece` package) or, failing that, tokenizer.json."""
        files = read_tokenizer_files(directory)
        if files.has("spiece.model"):
            pieces, charsmap = read_sentencepiece_model(files.path("spiece.model"))
        elif (files.tokenizer_json or {}).get("model", {}).get("type") == "Unigram":
            pieces = [(piece, float(score)) for piece, score in files.tokenizer_json["model"]["vocab"]]
            charsmap = charsmap_from_tokenizer_json(files.tokenizer_json)
        else:
            raise FileNotFoundError(f"{files.directory}: missing spiece.model")
        extra_ids = files.config.get("extra_ids", 100)
        special_tokens = files.special_tokens(**cls.default_special_tokens)
        return cls(pieces, charsmap, extra_ids=extra_ids, special_tokens=special_tokens, **files.common_kwargs())


def read_sentencepiece_model(path: str) -> tuple[list[tuple[str, float]], bytes | None]:
    """(piece, score) for every id, and the normalizer's precompiled charsmap, from a SentencePiece model file."""
    import sentencepiece

    model = sentencepiece.SentencePieceProcessor(model_file=path)
    pieces = [(model.id_to_piece(i), model.get_score(i)) for i in range(model.get_piece_size())]
    # The charsmap is not exposed by the API: read it from the model's protobuf (ModelProto.normalizer_spec = 3,
    # NormalizerSpec.precompiled_charsmap = 2).
    normalizer_spec = _protobuf_fields(model.serialized_model_proto()).get(3, b"")
    return pieces, _protobuf_fields(normalizer_spec).get(2) or None


def _protobuf_fields(message: bytes) -> dict[int, object]:
    """The last value of each field of a protobuf message (length-delimited fields as bytes)."""

    def varint(i: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = message[i]
            value |= (byte & 0x7F) << shift
            shift += 7
            i += 1
            if byte < 0x80:
                return value, i

    fields, i = {}, 0
    while i < len(message):
        key, i = varint(i)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields[field], i = varint(i)
        elif wire_type == 2:
            length, i = varint(i)
            fields[field], i = message[i : i + length], i + length
        elif wire_type in (1, 5):  # fixed 64 / 32 bits
            size = 8 if wire_type == 1 else 4
            fields[field], i = message[i : i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
    return fields


def charsmap_from_tokenizer_json(tokenizer_json: dict) -> bytes | None:
    normalizer = tokenizer_json.get("normalizer") or {}
    for step in normalizer.get("normalizers", [normalizer]):
        if step.get("type") == "Precompiled" and step.get("precompiled_charsmap"):
            return base64.b64decode(step["precompiled_charsmap"])
    return None
