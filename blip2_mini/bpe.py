"""OPT's tokenizer: GPT-2 byte-level BPE (Radford et al., 2019), plus a small trainer for such vocabularies.

BLIP-2's OPT language models read text through the GPT-2 tokenizer (OPT reuses GPT-2's 50k BPE vocabulary). Three
ideas make it up:

- Byte level. Text is UTF-8 encoded and each of the 256 byte values is drawn as one printable character
  (`BYTE_TO_UNICODE`: printable ASCII and Latin-1 stand for themselves, the rest are shifted above U+0100, so a
  space becomes "Ġ" and a newline "Ċ"). Any string can therefore be encoded: there is no unknown token.
- Pre-tokenization. A regex cuts the text into words before BPE runs, so merges never cross a word boundary:
  contractions ('s 't 're 've 'm 'll 'd), runs of letters, runs of digits, runs of other symbols (each optionally
  preceded by one space, which stays glued to the word: " dog"), and runs of whitespace.
- BPE. Each word starts as single bytes; the merge with the best rank (earliest learned) among adjacent pairs is
  applied, everywhere in the word, until no listed merge applies.

What is unusual for OPT: the BOS token is `</s>` (id 2, also the EOS) and it is prepended when encoding with
special tokens (`add_bos_token` in tokenizer_config.json); no EOS is appended.
"""

import heapq
import json
import os
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable

from .tokenizer import WHITE_SPACE, Tokenizer, read_json, read_tokenizer_files


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:  # control bytes, space, DEL, NBSP, soft hyphen: move them above U+00FF
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}

CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")


def _char_class(ch: str) -> str:
    """'S' whitespace, 'L' letter (\\p{L}), 'N' number (\\p{N}), 'O' anything else."""
    if ch in WHITE_SPACE:
        return "S"
    major = unicodedata.category(ch)[0]
    return major if major in "LN" else "O"


def split_words(text: str) -> list[str]:
    """GPT-2's pre-tokenization, written out by hand because Python's `re` has no \\p{L} / \\p{N}.

    The regex it reproduces, tried alternative by alternative at each position:
        's|'t|'re|'ve|'m|'ll|'d | ?\\p{L}+ | ?\\p{N}+ | ?[^\\s\\p{L}\\p{N}]+ | \\s+(?!\\S) | \\s+
    """
    classes = [_char_class(ch) for ch in text]
    n = len(text)

    def end_of_run(j: int) -> int:  # first index after the run of characters of the same class as text[j]
        cls = classes[j]
        while j < n and classes[j] == cls:
            j += 1
        return j

    words, i = [], 0
    while i < n:
        if text[i] == "'":
            suffix = next((s for s in CONTRACTIONS if text.startswith(s, i + 1)), None)
            if suffix is not None:
                words.append(text[i : i + 1 + len(suffix)])
                i += 1 + len(suffix)
                continue
        # ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: one optional space, then a run of one class.
        start = i + 1 if text[i] == " " and i + 1 < n and classes[i + 1] != "S" else i
        if classes[start] != "S":
            end = end_of_run(start)
        else:
            # `\s+(?!\S)`: a whitespace run, less its last character when a word follows, so that the word
            # keeps its leading space (" a  dog" -> " a", " ", " dog"); `\s+` when the run is one character.
            end = end_of_run(i)
            if end < n and end - i > 1:
                end -= 1
        words.append(text[i:end])
        i = end
    return words


def byte_encode(word: str) -> str:
    """A word as the printable characters standing for its UTF-8 bytes ("é" -> "Ã©")."""
    return "".join(BYTE_TO_UNICODE[b] for b in word.encode("utf-8"))


def apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every occurrence of `pair` in `symbols`, scanning left to right."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


class ByteLevelBPETokenizer(Tokenizer):
    """GPT-2 / OPT byte-level BPE tokenizer (the reference's `GPT2Tokenizer`)."""

    default_special_tokens = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    supports_cleanup = False  # the reference skips `clean_up_tokenization` for BPE: it would corrupt the text

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        add_prefix_space: bool = False,
        prefix_ids: list[int] | None = None,
        suffix_ids: list[int] | None = None,
        **kwargs,
    ):
        self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.add_prefix_space = add_prefix_space
        self._cache: dict[str, list[str]] = {}
        super().__init__(vocab, **kwargs)
        # The special tokens around a sequence: tokenizer.json's template when given, else the add_*_token flags.
        if prefix_ids is None:
            prefix_ids = [self.bos_token_id] if add_bos_token and self.bos_token_id is not None else []
        if suffix_ids is None:
            suffix_ids = [self.eos_token_id] if add_eos_token and self.eos_token_id is not None else []
        self.prefix_ids, self.suffix_ids = prefix_ids, suffix_ids

    def pre_tokenize(self, text: str) -> list[str]:
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        return [byte_encode(word) for word in split_words(text)]

    def tokenize_word(self, word: str) -> list[str]:
        if word not in self._cache:
            # A byte missing from the vocabulary is dropped, as the reference does (it has no unknown token).
            symbols = [ch for ch in word if ch in self.vocab]
            while len(symbols) > 1:
                pairs = zip(symbols, symbols[1:])
                best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float("inf")))
                if best not in self.merge_ranks:
                    break
                symbols = apply_merge(symbols, best)
            self._cache[word] = symbols
        return self._cache[word]

    def _with_special_tokens(self, ids: list[int]) -> list[int]:
        return self.prefix_ids + ids + self.suffix_ids

    def decode_tokens(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            if all(ch in UNICODE_TO_BYTE for ch in token):
                data += bytes(UNICODE_TO_BYTE[ch] for ch in token)
            else:  # an added token such as "<image>" written with characters outside the byte table
                data += token.encode("utf-8")
        return data.decode("utf-8", errors="replace")

    @classmethod
    def from_pretrained(cls, directory) -> "ByteLevelBPETokenizer":
        """Read tokenizer.json (as `save_pretrained` writes it) or vocab.json + merges.txt (as OPT publishes them)."""
        files = read_tokenizer_files(directory)
        model = (files.tokenizer_json or {}).get("model", {})
        if model.get("type") == "BPE":
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            vocab = read_json(files.require("vocab.json"))
            merges = read_merges(files.require("merges.txt"))
        config = files.config
        kwargs = dict(add_prefix_space=bool(config.get("add_prefix_space", False)))
        if "add_bos_token" in config or "add_eos_token" in config:
            kwargs.update(add_bos_token=bool(config.get("add_bos_token")), add_eos_token=bool(config.get("add_eos_token")))
        elif files.tokenizer_json and files.tokenizer_json.get("post_processor"):
            kwargs.update(zip(("prefix_ids", "suffix_ids"), template_special_ids(files.tokenizer_json["post_processor"])))
        special_tokens = files.special_tokens(**cls.default_special_tokens)
        return cls(vocab, merges, special_tokens=special_tokens, **files.common_kwargs(), **kwargs)


def read_merges(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def template_special_ids(post_processor: dict) -> tuple[list[int], list[int]]:
    """The special-token ids a tokenizer.json post-processor puts before and after a single sequence."""
    kind = post_processor.get("type")
    if kind == "Sequence":
        prefix, suffix = [], []
        for step in post_processor["processors"]:
            p, s = template_special_ids(step)
            prefix, suffix = p + prefix, suffix + s
        return prefix, suffix
    if kind == "ByteLevel":  # only adjusts offsets
        return [], []
    if kind != "TemplateProcessing":
        raise ValueError(f"unsupported tokenizer.json post_processor type {kind!r}")
    prefix, suffix, seen_sequence = [], [], False
    for item in post_processor["single"]:
        if "Sequence" in item:
            seen_sequence = True
        else:
            ids = post_processor["special_tokens"][item["SpecialToken"]["id"]]["ids"]
            (suffix if seen_sequence else prefix).extend(ids)
    return prefix, suffix


# ----- training ----------------------------------------------------------------------------------------------------

# What makes a directory written by `train_bpe` an OPT-style tokenizer: write this as tokenizer_config.json.
OPT_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "bos_token": "</s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_prefix_space": False,
}


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], out_dir, min_frequency: int = 2
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a byte-level BPE vocabulary and write `vocab.json` + `merges.txt` (GPT-2 format) to `out_dir`.

    The vocabulary is: the special tokens (ids 0, 1, ...), the 256 byte symbols, then one token per merge. Each merge
    joins the most frequent adjacent pair of symbols in the corpus (ties: the smallest pair, for determinism),
    until `vocab_size` is reached or no pair occurs `min_frequency` times. Returns (vocab, merges).
    """
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for symbol in BYTE_TO_UNICODE.values():
        vocab.setdefault(symbol, len(vocab))
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(vocab)} special and byte tokens")

    # The corpus as a bag of words, each word a list of symbols (initially its bytes); merges never cross words.
    word_counts = Counter(byte_encode(word) for text in texts for word in split_words(text))
    words = [list(word) for word in word_counts]
    counts = list(word_counts.values())

    # How often each adjacent pair occurs, and in which words; a heap to find the most frequent pair quickly.
    # The heap holds (-count, pair) entries, stale ones (count changed since) are skipped when popped.
    pair_counts: Counter = Counter()
    words_with_pair = defaultdict(set)
    for w, (symbols, count) in enumerate(zip(words, counts)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += count
            words_with_pair[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges, merged = [], set()
    while len(vocab) < vocab_size and heap:
        negative_count, pair = heapq.heappop(heap)
        if -negative_count != pair_counts[pair] or pair in merged:
            # A stale entry, or a pair that reappeared after its merge ("abc" can be built as "ab"+"c" and as
            # "a"+"bc"): encoding applies that merge again anyway, so it is not listed twice.
            continue
        if -negative_count < min_frequency:
            break
        merges.append(pair)
        merged.add(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        # Re-count the pairs of every word that contained `pair`, before and after merging it.
        changed = set()
        for w in words_with_pair.pop(pair):
            old, new = words[w], apply_merge(words[w], pair)
            for p in zip(old, old[1:]):
                pair_counts[p] -= counts[w]
            for p in zip(new, new[1:]):
                pair_counts[p] += counts[w]
                words_with_pair[p].add(w)
            changed.update(zip(old, old[1:]), zip(new, new[1:]))
            words[w] = new
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))

    save_vocab_and_merges(out_dir, vocab, merges)
    return vocab, merges


def save_vocab_and_merges(out_dir, vocab: dict[str, int], merges: list[tuple[str, str]]):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
