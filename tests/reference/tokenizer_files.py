"""Train small tokenizers in the official formats with the reference libraries, and the texts to test them on.

    make_opt_tokenizer(out_dir)   byte-level BPE, OPT conventions (BOS </s> = 2, <pad> = 1)  -> GPT2Tokenizer
    make_bert_tokenizer(out_dir)  uncased WordPiece, plus [DEC] as BOS (blip2-itm-vit-g's Q-Former tokenizer)
    make_t5_tokenizer(out_dir)    SentencePiece unigram with 100 <extra_id_N> sentinels, like Flan-T5

Each trains on `training_corpus()` with the `tokenizers` / `sentencepiece` trainers, builds the reference class
from the trained files, saves it with `save_pretrained` (which writes tokenizer.json + tokenizer_config.json)
and adds the files the published checkpoints also carry (vocab.json + merges.txt, vocab.txt, spiece.model).
All three are deterministic and return the reference tokenizer. Used by build_tokenizer_fixtures.py, by the
live tests and by whoever needs a tokenizer directory in the official layout (e.g. checkpoint fixtures).

`STRESS_CORPUS` and `random_texts` are what the tokenizers are compared on. Nothing here is imported by
blip2_mini; `transformers`, `tokenizers` and `sentencepiece` are imported inside the functions, so the texts can
be used without them.
"""

import random
import shutil
import unicodedata
from pathlib import Path

# ----- what the tokenizers are trained on --------------------------------------------------------------------------

_WORDS = """a an the woman man dog dogs cat cats child children bird birds truck car bicycle street beach river sky
snow table pizza building city tree trees park field grass water boat train bus plane kitchen room bed window
door wall sign clock phone computer laptop book books food plate bowl cup glass bottle chair couch bench horse
sheep cow elephant giraffe zebra bear kite umbrella surfboard skateboard ball frisbee racket person people
group crowd player team game sitting standing walking running riding holding eating playing looking flying
parked lying jumping swimming wearing carrying throwing catching cutting cooking reading talking smiling
on in at with next to near over under behind front of and or but while during after before above below
red blue green yellow white black brown orange pink purple gray large small big little tall short old young
new wooden metal plastic open closed empty full busy quiet sunny cloudy rainy snowy bright dark colorful
question answer which what where who why how is are was were be been this that these those it its they them
photo picture image view scene close up top bottom side left right middle there here very many some few two three""".split()
_PHRASES = ["Question: which city is this? Answer:", "It's not a city, it's a beach.", "I'm sure we'll see; they've gone.",
            "café déjà vu naïve résumé", "東京の夜景はきれいです", "猫が好き。犬も好き。", "北京 上海 广州", "🙂 smile 🐶 dog 🎉",
            "Ünïcödé ß straße Ærø", "12 apples, 3.5 kg; 2024-01-01 at 10:30", "HELLO World!!", "e-mail: test@example.com",
            "(brackets) [square] {curly} <angle>", "Привет мир", "γειά σου κόσμε", "مرحبا بالعالم", "naïve coöperate",
            "don't can't won't isn't", "$100 + 20% = #1 & more", "tab\tseparated\tvalues", "line one\nline two"]  # fmt: skip
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "zo", "bel", "dor", "fen", "gar", "hul", "jin", "kor", "lan",
              "mur", "pex", "qua", "vin"]  # fmt: skip


def training_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Caption-like sentences, made-up words (so that the unigram model has enough distinct pieces) and a few
    lines of accents, CJK, emoji, numbers and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            lines.append(rng.choice(_PHRASES))
        elif r < 0.3:
            lines.append(" ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
                                  for _ in range(rng.randint(2, 8))))  # fmt: skip
        else:
            line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
            if rng.random() < 0.5:
                line = line.capitalize()
            lines.append(line + rng.choice(["", ".", "!", "?", ",", " 42.", " in 1999."]))
    return lines


# ----- the three tokenizers ----------------------------------------------------------------------------------------


def make_opt_tokenizer(out_dir, vocab_size: int = 800, image_token: bool = False, vocab_files_only: bool = False):
    """OPT-style byte-level BPE in `out_dir`: <s> 0, <pad> 1, </s> 2 (BOS and EOS), <unk> 3, BOS prepended.

    image_token: add `<image>` the way Blip2Processor does (special, unnormalized, next free id).
    vocab_files_only: the layout of the facebook/opt-* repos instead: vocab.json, merges.txt,
    special_tokens_map.json and a tokenizer_config.json with add_bos_token, but no tokenizer.json.
    """
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    out_dir = Path(out_dir)
    raw = out_dir / "trained"
    raw.mkdir(parents=True, exist_ok=True)
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(training_corpus(), vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>"])  # fmt: skip
    trainer.save_model(str(raw))
    tokenizer = GPT2Tokenizer(vocab=str(raw / "vocab.json"), merges=str(raw / "merges.txt"), bos_token="</s>",
                              eos_token="</s>", pad_token="<pad>", unk_token="<unk>", add_bos_token=True)  # fmt: skip
    if image_token:
        tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    tokenizer.save_pretrained(out_dir)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(raw / name, out_dir / name)
    shutil.rmtree(raw)
    if vocab_files_only:
        import json

        (out_dir / "tokenizer.json").unlink()
        config = json.loads((out_dir / "tokenizer_config.json").read_text())
        config["add_bos_token"] = True  # the saved tokenizer.json carried the BOS template; now the config must
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
        tokenizer = GPT2Tokenizer.from_pretrained(out_dir)
    return tokenizer


def make_bert_tokenizer(out_dir, vocab_size: int = 800, bos_token: str | None = "[DEC]"):
    """Uncased BERT WordPiece in `out_dir`: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4; `bos_token` [DEC] is
    added after the vocabulary, as in the BLIP-2 retrieval checkpoints (their Q-Former decodes from [DEC]).

    `tokenizers`' WordPiece trainer breaks ties differently from run to run, so the vocabulary is learned with its
    (deterministic) BPE trainer on BERT's normalization and pre-tokenization instead, and every learned piece is
    listed twice: as a word start ("play") and as a continuation ("##play").
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizers.BertNormalizer(lowercase=True)
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + (vocab_size - len(specials)) // 2, min_frequency=2,
                                  special_tokens=specials, show_progress=False)  # fmt: skip
    bpe.train_from_iterator(training_corpus(), trainer)
    pieces = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1]) if t not in specials]
    vocab = specials + [p for piece in pieces for p in (piece, "##" + piece)]
    (out_dir / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    kwargs = {"bos_token": bos_token} if bos_token else {}
    tokenizer = BertTokenizer(vocab=str(out_dir / "vocab.txt"), **kwargs)
    tokenizer.save_pretrained(out_dir)  # keeps vocab.txt beside tokenizer.json, as the BERT repos have it
    return tokenizer


def make_t5_tokenizer(out_dir, vocab_size: int = 1000, extra_ids: int = 100, spiece_only: bool = False):
    """T5-style SentencePiece unigram in `out_dir`: <pad> 0, </s> 1, <unk> 2, no BOS, NFKC-like normalization
    ("nmt_nfkc", as T5's), `extra_ids` sentinels after the vocabulary.

    spiece_only: leave only spiece.model (the reference then builds everything from it, with its defaults).
    """
    import sentencepiece
    from transformers import T5Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus()), model_prefix=str(out_dir / "spiece"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    (out_dir / "spiece.vocab").unlink()
    tokenizer = T5Tokenizer.from_pretrained(out_dir, extra_ids=extra_ids)
    if not spiece_only:
        tokenizer.save_pretrained(out_dir)  # keeps spiece.model beside tokenizer.json, as Flan-T5's repos do
    return tokenizer


# ----- what they are compared on -----------------------------------------------------------------------------------

# Each string tests something a tokenizer can get wrong; special tokens of all three families are mixed in.
STRESS_CORPUS = [
    "",
    " ",
    "a",
    "Hello world",
    "a photo of",
    "Question: which city is this? Answer:",
    "a woman sitting on the beach with a dog",
    " leading space",
    "trailing space ",
    "  two leading and two trailing  ",
    "runs   of    spaces",
    "tabs\tand\t\ttabs",
    "new\nlines\n\nand\r\nCRLF",
    "mixed \t\n whitespace \u00a0 nbsp \u3000 ideographic \u2003 em",
    "\n\n\n",
    "I'm it's we'll they've you're she'd can't won't",
    "I'M IT'S WE'LL",
    "quotes 'single' \"double\" ‘curly’ “curly”",
    "numbers 0 12 345 6789 3.14159 1,000,000 -42 1e-5",
    "punctuation!?.,;:-_()[]{}<>/\\@#$%^&*+=~`|",
    "...!!!???",
    "MiXeD CaSe WoRdS and UPPER and lower",
    "café déjà vu naïve résumé façade",
    "combining: e\u0301 a\u0300 o\u0308 n\u0303 A\u030a c\u0327",
    "stacked marks a\u0301\u0302\u0303 e\u0301\u0327x",
    "full-width ＡＢＣ ａｂｃ １２３ and Ａ\u0301",
    "ligatures ﬁ ﬂ ﬀ and compatibility ① ½ ² ™ ℃",
    "Straße Œuvre Ærø İstanbul ΣΟΦΙΑ σοφίας",
    "Привет мир, как дела?",
    "γειά σου κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "東京の夜景はきれいです",
    "北京上海广州深圳",
    "한국어 텍스트 테스트",
    "ｶﾞｷﾞ half-width katakana",
    "emoji 🙂🐶🎉 👍🏽 ❤️ 🇯🇵🇫🇷",
    "zwj family 👩‍👩‍👧‍👦 and 👩‍💻",
    "zero\u200bwidth\u200cjoiners\u200dand\ufeffbom\u00adsoft",
    "control \x00 \x01 \x1c \x1f \x7f \x85 chars",
    "replacement \ufffd char",
    "private use \ue000\uf8ff",
    "</s>",
    "<pad>",
    "text</s>more text",
    "a <image> in the middle <image><image>",
    "<image> first",
    "last <image>",
    "<unk> and <s> and <mask>",
    "[CLS] bert [SEP] [MASK] [PAD] [UNK] [DEC] [cls]",
    "<extra_id_0> sentinel <extra_id_1>x<extra_id_99>",
    "partial </s <pad <image <extra_id_>",
    "Ġ Ċ ▁ ## ##ing",
    "▁word▁with▁metaspace",
    "email@example.com https://example.com/path?q=1&b=2",
    "supercalifragilisticexpialidocious",
    "a" * 150,
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "The quick brown fox jumps over the lazy dog. " * 4,
]

_POOLS = [
    "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", "      ",
    " \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2003\u2028\u3000", "'\"!?.,;:-_()[]{}<>/\\@#$%^&*+=~`|",
    "éèêëàâäôöüçñßøåæœİıΣσς", "\u0300\u0301\u0302\u0308\u0327\u0338\u20dd\u0340\u0345", "東京猫犬北京上海日本語中文",
    "ひらがなカタカナｶﾞﾞ", "한국어텍스트", "Приветмир", "γειάσου", "مرحبا", "नमस्ते", "🙂🐶🎉👩💻🇯🇵❤👍🏽\u200d\ufe0f",
    "ＡＢＣ１２３ﬁ①½²™", "\u200b\u200c\u200d\ufeff\u00ad\x00\x7f\ufffd",
]  # fmt: skip
_TOKENS = ["</s>", "<pad>", "<unk>", "<s>", "<image>", "[CLS]", "[SEP]", "[DEC]", "[MASK]", "<extra_id_0>",
           "<extra_id_42>", "'s", "'ll", "n't", "I'm", " the", "ing", "▁", "##"]  # fmt: skip


def random_id_sequences(n: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`n` random id sequences (to decode: for byte-level BPE most are not valid UTF-8)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """`n` random strings: mostly characters from the pools above (scripts, marks, whitespace, emoji), some
    random assigned code points of the whole Unicode range, and special tokens of all three families.

    Code points unassigned in Python's Unicode data are left out: for those our character classes and the
    reference's newer Unicode tables may legitimately disagree.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            if r < 0.7:
                parts.append(rng.choice(rng.choice(_POOLS)))
            elif r < 0.85:
                parts.append(rng.choice(_TOKENS))
            else:
                while True:
                    ch = chr(rng.randrange(0x20, 0x110000))
                    if unicodedata.category(ch) not in ("Cn", "Cs"):
                        break
                parts.append(ch)
        out.append("".join(parts))
    return out
