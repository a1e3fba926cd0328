"""Text tokenizers: the interface the three tokenizers share, the added-token splitter, and `load_tokenizer`.

BLIP-2 meets three tokenizers: byte-level BPE for OPT (bpe.py), WordPiece for the Q-Former's BERT text side
(wordpiece.py) and a SentencePiece unigram model for Flan-T5 (t5_tokenizer.py). Each must give the ids the
published checkpoints were trained with, i.e. the ids of the reference (`transformers` 5.x, whose tokenizers all
run the Rust `tokenizers` pipeline). That pipeline has the same five steps for every model, and so does
`Tokenizer.encode` here:

    text ──split out added tokens──> pieces ──normalize──> ──pre-tokenize──> words ──model──> tokens ──> ids
                                                                                     + special tokens (BOS/EOS/CLS/SEP)

1. Added tokens (`</s>`, `<pad>`, `<image>`, `[CLS]`, `<extra_id_0>`, ...) are found in the raw text first, leftmost
   and longest match wins, and are never split further. Tokens marked `normalized` are searched for a second
   time, in the normalized text.
2. normalize / 3. pre-tokenize / 4. model: one method each, written by the subclass.
5. `_with_special_tokens` adds the sequence's special tokens (BOS for OPT, [CLS]...[SEP] for BERT, EOS for T5).

Decoding runs the other way: ids -> token strings (special ones dropped on request) -> the subclass's
`decode_tokens`.
"""

import json
import os
import unicodedata
from dataclasses import dataclass, replace

# Unicode's White_Space property: what the reference means by whitespace (Rust's `char::is_whitespace`, `\s` in
# its regexes). Python's `str.isspace()` differs: it also accepts the separators U+001C..U+001F.
WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

# The named special tokens, in the order the reference lists them in `all_special_ids`.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"


def check_padding(padding):
    """The padding values implemented here (pad to the longest, or not at all); transformers' other names would
    be truthy strings, "do_not_pad" included, so they are refused rather than read as True."""
    if padding not in (True, False, "longest"):
        raise ValueError(f"padding must be True, False or 'longest', got {padding!r}")


# Symbols that Unicode counts as letters (Other_Alphabetic): the circled and squared Latin letters.
ALPHABETIC_SYMBOLS = ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))


def is_word_char(ch: str) -> bool:
    """`\\w` of the reference's regex engine (Rust's, Unicode): alphabetic characters (letters, letter-like
    numbers such as Roman numerals, the symbols above), marks, decimal digits, connector punctuation and the two
    joiners. Not other numbers: superscripts, fractions and circled digits are not word characters."""
    category = unicodedata.category(ch)
    return (category[0] in "LM" or category in ("Nd", "Nl", "Pc") or ch in "\u200c\u200d"
            or any(lo <= ord(ch) <= hi for lo, hi in ALPHABETIC_SYMBOLS))


@dataclass
class AddedToken:
    """A token matched in the raw text before the model sees it (same fields as `tokenizers.AddedToken`)."""

    content: str
    special: bool = True
    single_word: bool = False  # only match when not inside a word
    lstrip: bool = False  # the match also swallows the whitespace on its left
    rstrip: bool = False  # ... and on its right
    normalized: bool = False  # searched for in the normalized text instead of the raw text

    @classmethod
    def from_json(cls, entry) -> "AddedToken":
        """From a string or a `{"content": ..., "lstrip": ...}` dict as tokenizer.json / tokenizer_config.json store it."""
        if isinstance(entry, str):
            return cls(entry)
        fields = ("special", "single_word", "lstrip", "rstrip", "normalized")
        return cls(entry["content"], **{f: bool(entry[f]) for f in fields if f in entry})


def find_added_tokens(text: str, tokens: dict[str, int], added: dict[int, AddedToken]) -> list[tuple[str, int | None]]:
    """Split `text` into (piece, None) and (added token text, id), the way the reference's AddedVocabulary does.

    The search is leftmost-longest: scanning from the left, the first position where some added token starts
    wins, and of the tokens starting there the longest. `lstrip` / `rstrip` tokens take the neighbouring
    whitespace with them; `single_word` tokens are skipped when glued to a word character.
    """
    if not tokens:
        return [(text, None)] if text else []
    first_chars = {}
    for content in tokens:
        first_chars.setdefault(content[0], []).append(content)
    for candidates in first_chars.values():
        candidates.sort(key=len, reverse=True)  # longest first: the first hit is the longest match

    pieces, piece_start, i = [], 0, 0
    while i < len(text):
        match = next((c for c in first_chars.get(text[i], ()) if text.startswith(c, i)), None)
        if match is None:
            i += 1
            continue
        start, stop = i, i + len(match)
        token = added[tokens[match]]
        if token.single_word and (
            (start > 0 and is_word_char(text[start - 1])) or (stop < len(text) and is_word_char(text[stop]))
        ):
            i = stop  # not a match after all; the search goes on after it
            continue
        if token.lstrip:
            while start > piece_start and text[start - 1] in WHITE_SPACE:
                start -= 1
        if token.rstrip:
            while stop < len(text) and text[stop] in WHITE_SPACE:
                stop += 1
        if piece_start < start:
            pieces.append((text[piece_start:start], None))
        pieces.append((text[start:stop], tokens[match]))
        piece_start = i = stop
    if piece_start < len(text):
        pieces.append((text[piece_start:], None))
    return pieces


class Tokenizer:
    """Base class: vocabulary, added tokens, special tokens, batching and padding. Subclasses supply the model.

    Subclasses implement `normalize`, `pre_tokenize`, `tokenize_word`, `decode_tokens` and `_with_special_tokens`,
    and a `from_pretrained(directory)` that reads their files and calls this constructor.
    """

    # The named special tokens used when neither the caller nor the directory's config names them.
    default_special_tokens: dict[str, str] = {}
    # Whether decoding may apply `clean_up_tokenization` (the reference never does it for BPE models).
    supports_cleanup = True

    def __init__(
        self,
        vocab: dict[str, int],
        added_tokens: dict[int, AddedToken] | None = None,
        special_tokens: dict[str, str | AddedToken | None] | None = None,
        extra_special_tokens: list[str] | None = None,
        padding_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.vocab = dict(vocab)
        self.added_tokens: dict[int, AddedToken] = {}
        if special_tokens is None:
            special_tokens = self.default_special_tokens
        special_tokens = {name: tok for name, tok in special_tokens.items() if tok is not None}
        self.special_tokens = {name: getattr(tok, "content", tok) for name, tok in special_tokens.items()}
        self.extra_special_tokens = list(extra_special_tokens or [])
        self.padding_side = padding_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._refresh()
        for token_id, token in sorted((added_tokens or {}).items()):
            self._add_token(token, token_id)
        # Like the reference, every named special token becomes an added token (a new id if the vocabulary lacks it).
        for token in [*special_tokens.values(), *self.extra_special_tokens]:
            token = AddedToken(token) if isinstance(token, str) else replace(token, special=True)
            if token.content not in self._added_ids:
                self._add_token(token)
        self._refresh()

    # ----- vocabulary --------------------------------------------------------------------------------------------

    def _add_token(self, token: AddedToken, token_id: int | None = None) -> int:
        """Register an added token: it keeps its vocabulary id if it has one, else gets the next free id."""
        if token_id is None:
            token_id = self.vocab.get(token.content, self._added_ids.get(token.content))
        if token_id is None:
            token_id = max([len(self.vocab) - 1, *self.added_tokens]) + 1
        self.added_tokens[token_id] = token
        self._added_ids[token.content] = token_id
        return token_id

    def _refresh(self):
        """Rebuild the lookup tables derived from `vocab` and `added_tokens`."""
        self._added_ids = {tok.content: i for i, tok in self.added_tokens.items()}
        self._token_to_id = {**self.vocab, **self._added_ids}
        # Normalized added tokens are looked for in normalized text, so in their normalized form, which is also
        # the form the reference gives back when decoding ("Beach" -> "beach" for uncased BERT).
        added_forms = {i: self.normalize(t.content) if t.normalized else t.content for i, t in self.added_tokens.items()}
        self._id_to_token = {i: t for t, i in self.vocab.items()} | added_forms
        self._special_ids = {i for i, tok in self.added_tokens.items() if tok.special}
        self._raw_added = {added_forms[i]: i for i, t in self.added_tokens.items() if not t.normalized}
        self._normalized_added = {added_forms[i]: i for i, t in self.added_tokens.items() if t.normalized}

    def add_special_tokens(self, tokens: list[str]) -> int:
        """Add tokens (e.g. `<image>`) as special, unnormalized added tokens; returns how many were new."""
        new = [t for t in tokens if t not in self._added_ids]
        for content in new:
            self._add_token(AddedToken(content, special=True, normalized=False))
        self._refresh()
        return len(new)

    def __len__(self) -> int:
        """Vocabulary size including the added tokens."""
        return len(self._token_to_id)

    def __contains__(self, token: str) -> bool:
        return token in self._token_to_id

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def _special_token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token_id = property(lambda self: self._special_token_id("bos_token"))
    eos_token_id = property(lambda self: self._special_token_id("eos_token"))
    pad_token_id = property(lambda self: self._special_token_id("pad_token"))
    unk_token_id = property(lambda self: self._special_token_id("unk_token"))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens, then of the extra ones (without repeats), as the reference lists them."""
        names = [self.special_tokens[n] for n in SPECIAL_TOKEN_NAMES if n in self.special_tokens]
        return [self.convert_tokens_to_ids(t) for t in dict.fromkeys(names + self.extra_special_tokens)]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Token string(s) -> id(s); a token outside the vocabulary gives the unknown token's id."""
        if isinstance(tokens, str):
            token_id = self._token_to_id.get(tokens)
            return token_id if token_id is not None else self._token_to_id.get(self.special_tokens.get("unk_token"))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids) -> list[str | None]:
        """Id(s) -> token strings (None for an id outside the vocabulary, as in the reference)."""
        return [self._id_to_token.get(i) for i in _as_id_list(ids)]

    # ----- encoding ----------------------------------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        return text

    def pre_tokenize(self, text: str) -> list[str]:
        raise NotImplementedError

    def tokenize_word(self, word: str) -> list[str]:
        raise NotImplementedError

    def _with_special_tokens(self, ids: list[int]) -> list[int]:
        return ids

    def _split(self, text: str) -> list[tuple[str, int | None]]:
        """Steps 1-2: added tokens out of the raw text, normalize the rest, normalized added tokens out of that."""
        pieces = []
        for raw, token_id in find_added_tokens(text, self._raw_added, self.added_tokens):
            if token_id is not None:
                pieces.append((raw, token_id))
            else:
                pieces += find_added_tokens(self.normalize(raw), self._normalized_added, self.added_tokens)
        return pieces

    def _tokens_and_ids(self, text: str) -> list[tuple[str, int]]:
        """Steps 1-4: (token, id) for each token of `text`, without the sequence's special tokens."""
        out = []
        for piece, token_id in self._split(text):
            if token_id is not None:
                out.append((piece, token_id))
            else:
                tokens = [token for word in self.pre_tokenize(piece) for token in self.tokenize_word(word)]
                out += zip(tokens, self.convert_tokens_to_ids(tokens))
        return out

    def tokenize(self, text: str) -> list[str]:
        """Text -> token strings, without the sequence's special tokens (like the reference's `tokenize`)."""
        return [token for token, _ in self._tokens_and_ids(text)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [token_id for _, token_id in self._tokens_and_ids(text)]
        return self._with_special_tokens(ids) if add_special_tokens else ids

    def __call__(self, texts: str | list[str], padding: bool = False, add_special_tokens: bool = True, return_tensors=None):
        """Encode one text or a batch: {"input_ids", "attention_mask"}, padded with the pad id on `padding_side`."""
        check_padding(padding)
        single = isinstance(texts, str)
        batch = [self.encode(t, add_special_tokens=add_special_tokens) for t in ([texts] if single else texts)]
        masks = [[1] * len(ids) for ids in batch]
        if padding and len(set(map(len, batch))) > 1:
            if self.pad_token_id is None:
                raise ValueError("cannot pad: this tokenizer has no pad token")
            length = max(map(len, batch))
            for ids, mask in zip(batch, masks):
                n = length - len(ids)
                if self.padding_side == "right":
                    ids += [self.pad_token_id] * n
                    mask += [0] * n
                else:
                    ids[:0] = [self.pad_token_id] * n
                    mask[:0] = [0] * n
        if return_tensors is None:
            return {"input_ids": batch[0] if single else batch, "attention_mask": masks[0] if single else masks}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if len(set(map(len, batch))) > 1:
            raise ValueError("texts of different lengths: pass padding=True to return tensors")
        import torch  # only needed here; the tokenizers themselves are pure Python

        return {"input_ids": torch.tensor(batch, dtype=torch.long), "attention_mask": torch.tensor(masks, dtype=torch.long)}

    # ----- decoding ----------------------------------------------------------------------------------------------

    def decode_tokens(self, tokens: list[str]) -> str:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        # Like the reference, ids outside the vocabulary are dropped rather than raising.
        tokens = [
            self._id_to_token[i]
            for i in _as_id_list(ids)
            if i in self._id_to_token and not (skip_special_tokens and i in self._special_ids)
        ]
        text = self.decode_tokens(tokens)
        if self.clean_up_tokenization_spaces and self.supports_cleanup:
            text = clean_up_tokenization(text)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    @classmethod
    def from_pretrained(cls, directory):
        raise NotImplementedError


def _as_id_list(ids) -> list[int]:
    """A list, tuple or 1-D tensor of ids -> list of Python ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


CLEANUP_REPLACEMENTS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]  # fmt: skip


def clean_up_tokenization(text: str, replacements=CLEANUP_REPLACEMENTS) -> str:
    """Remove the spaces word-by-word decoding leaves before punctuation (the reference's `clean_up_tokenization`)."""
    for before, after in replacements:
        text = text.replace(before, after)
    return text


# ----- reading a tokenizer directory -----------------------------------------------------------------------------


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


@dataclass
class TokenizerFiles:
    """What a tokenizer directory says besides the model itself: config, special tokens, added tokens."""

    directory: str
    config: dict  # tokenizer_config.json, with special_tokens_map.json merged under it
    tokenizer_json: dict | None  # tokenizer.json, when present
    added_tokens: dict[int, AddedToken]

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def has(self, name: str) -> bool:
        return os.path.isfile(self.path(name))

    def require(self, name: str) -> str:
        """The path of a file the tokenizer cannot do without."""
        if not self.has(name):
            raise FileNotFoundError(f"{self.directory}: missing {name}")
        return self.path(name)

    def special_tokens(self, **defaults: str | None) -> dict[str, str | AddedToken | None]:
        """The named special tokens (`bos_token`, ...) from the config, else from `defaults`."""
        out = {name: defaults.get(name) for name in SPECIAL_TOKEN_NAMES}
        for name in SPECIAL_TOKEN_NAMES:
            value = self.config.get(name, out[name])
            out[name] = AddedToken.from_json(value) if isinstance(value, dict) else value
        return out

    def extra_special_tokens(self) -> list[str]:
        extra = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # {name: token} form
            extra = list(extra.values())
        return [t["content"] if isinstance(t, dict) else t for t in extra]

    def common_kwargs(self) -> dict:
        """Constructor arguments every tokenizer reads from its directory the same way."""
        return dict(
            added_tokens=self.added_tokens,
            extra_special_tokens=self.extra_special_tokens(),
            padding_side=self.config.get("padding_side", "right"),
            clean_up_tokenization_spaces=bool(self.config.get("clean_up_tokenization_spaces", False)),
        )


def read_tokenizer_files(directory) -> TokenizerFiles:
    """Read the config and added-token files of a tokenizer directory (all optional)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    config = {**read_json(os.path.join(directory, "special_tokens_map.json"), {}),
              **read_json(os.path.join(directory, TOKENIZER_CONFIG), {})}  # fmt: skip
    tokenizer_json = read_json(os.path.join(directory, TOKENIZER_JSON))
    # Added tokens can be listed in three places; the first one that names an id wins.
    added = {}
    for entry in (tokenizer_json or {}).get("added_tokens", []):
        added[entry["id"]] = AddedToken.from_json(entry)
    for token_id, entry in config.get("added_tokens_decoder", {}).items():
        added.setdefault(int(token_id), AddedToken.from_json(entry))
    files = TokenizerFiles(directory, config, tokenizer_json, added)
    # The legacy added_tokens.json only maps token -> id: a token is special when the config names it so.
    named = {getattr(t, "content", t) for t in files.special_tokens().values()} | set(files.extra_special_tokens())
    for content, token_id in read_json(os.path.join(directory, "added_tokens.json"), {}).items():
        added.setdefault(int(token_id), AddedToken(content, special=content in named, normalized=content not in named))
    return files


def load_tokenizer(directory) -> Tokenizer:
    """Load the tokenizer saved in `directory`, choosing the class from tokenizer_config.json or from the files."""
    from .bpe import ByteLevelBPETokenizer
    from .t5_tokenizer import T5Tokenizer
    from .wordpiece import WordPieceTokenizer

    by_class = {"GPT2Tokenizer": ByteLevelBPETokenizer, "BertTokenizer": WordPieceTokenizer, "T5Tokenizer": T5Tokenizer}
    by_model_type = {"BPE": ByteLevelBPETokenizer, "WordPiece": WordPieceTokenizer, "Unigram": T5Tokenizer}
    files = read_tokenizer_files(directory)
    class_name = files.config.get("tokenizer_class")
    if class_name:
        cls = by_class.get(class_name.removesuffix("Fast"))
        if cls is None:
            raise ValueError(f"{files.directory}: unsupported tokenizer_class {class_name!r} (supported: {', '.join(by_class)})")
    elif files.has("spiece.model"):
        cls = T5Tokenizer
    elif files.has("vocab.txt"):
        cls = WordPieceTokenizer
    elif files.has("vocab.json") and files.has("merges.txt"):
        cls = ByteLevelBPETokenizer
    elif files.tokenizer_json is not None and files.tokenizer_json.get("model", {}).get("type") in by_model_type:
        cls = by_model_type[files.tokenizer_json["model"]["type"]]
    else:
        raise FileNotFoundError(
            f"{files.directory}: no tokenizer files (expected vocab.json + merges.txt, vocab.txt, spiece.model or tokenizer.json)"
        )
    return cls.from_pretrained(directory)
