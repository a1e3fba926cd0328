"""Configuration: small dataclasses that mirror the official `config.json` of a BLIP-2 checkpoint.

A published BLIP-2 directory (e.g. Salesforce/blip2-opt-2.7b) carries one `config.json` with three nested
sections, one per stage of the paper's Figure 2:

    vision_config   the frozen image encoder (EVA-CLIP ViT-g/14)
    qformer_config  the Querying Transformer that bridges image and text
    text_config     the frozen language model (OPT, or Flan-T5 as an encoder-decoder)

plus a few top-level fields (`num_query_tokens`, `image_token_index`, ...). Every field name below is the
name used in that file, so a reader can put the two side by side. Only the fields the published checkpoints
use are modelled; variants are values here, not code paths elsewhere. Unknown extra fields are ignored (the
official files carry many generation and bookkeeping fields), but a *missing* required field, or a config of
another architecture, is reported in one line.
"""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that blip2_mini cannot use; the message says what is wrong and where."""


@dataclass
class VisionConfig:
    """EVA ViT-g/14 as used by BLIP-2 (39 of its 40 layers: the paper drops the last one)."""

    hidden_size: int = 1408  # Dv
    intermediate_size: int = 6144  # MLP width
    num_hidden_layers: int = 39
    num_attention_heads: int = 16  # head size 88
    image_size: int = 224  # 364 for the COCO-finetuned caption checkpoints
    patch_size: int = 14
    hidden_act: str = "gelu"  # exact (erf) GELU
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True  # q and v biases; k has none


@dataclass
class QFormerConfig:
    """The Q-Former: a BERT-base initialised transformer with learned queries and cross-attention."""

    hidden_size: int = 768  # Dq
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2  # cross-attention on layers where layer_idx % frequency == 0
    encoder_hidden_size: int = 1408  # = vision hidden_size (the keys/values of cross-attention)
    vocab_size: int = 30522  # BERT WordPiece vocabulary (text side, retrieval checkpoints only)
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    use_qformer_text_input: bool = False  # True when the checkpoint carries text embeddings + text FFNs


@dataclass
class OPTConfig:
    """OPT decoder-only language model (facebook/opt-2.7b, opt-6.7b)."""

    vocab_size: int = 50272
    hidden_size: int = 2560  # Dlm
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    ffn_dim: int = 10240
    max_position_embeddings: int = 2048
    activation_function: str = "relu"
    do_layer_norm_before: bool = True  # pre-LN (the 350m variant is post-LN and unsupported)
    word_embed_proj_dim: int = 2560  # == hidden_size for every checkpoint BLIP-2 uses
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2


@dataclass
class T5Config:
    """Flan-T5 encoder-decoder (google/flan-t5-xl, -xxl): T5 v1.1 with gated-GELU and an untied head."""

    vocab_size: int = 32128
    d_model: int = 2048  # Dlm
    d_kv: int = 64  # head size (d_model need not equal num_heads * d_kv in general)
    d_ff: int = 5120
    num_layers: int = 24  # encoder layers
    num_decoder_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0


@dataclass
class Blip2Config:
    """The whole model. `text_config` is an OPTConfig or a T5Config, or None for the retrieval checkpoints."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    qformer_config: QFormerConfig = field(default_factory=QFormerConfig)
    text_config: OPTConfig | T5Config | None = field(default_factory=OPTConfig)
    num_query_tokens: int = 32  # Q
    image_text_hidden_size: int = 256  # E, the retrieval embedding size
    image_token_index: int | None = None  # set: queries go into `<image>` slots; None: they are prepended

    @property
    def use_decoder_only_language_model(self) -> bool:
        return isinstance(self.text_config, OPTConfig)

    @classmethod
    def from_json_file(cls, path) -> "Blip2Config":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json here; is this a BLIP-2 checkpoint directory?") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Blip2Config":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: not a JSON object ({{...}}); is this a BLIP-2 config.json?")
        model_type = raw.get("model_type")
        if model_type != "blip-2":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'blip-2' "
                "(InstructBLIP, BLIP and other architectures are not supported by blip2_mini)"
            )
        vision = _build(VisionConfig, raw.get("vision_config"), f"{source}: vision_config")
        qformer = _build(QFormerConfig, raw.get("qformer_config"), f"{source}: qformer_config")
        # The reference always overwrites this with the vision width, so the file's value may be stale.
        qformer.encoder_hidden_size = vision.hidden_size

        text = raw.get("text_config")
        text_type = (text or {}).get("model_type")
        if "Blip2ForImageTextRetrieval" in (raw.get("architectures") or []) or not text:
            # Retrieval checkpoints (blip2-itm-vit-g) have no language model; their config.json may still carry
            # a default text_config, which the reference ignores for this architecture too.
            text_config = None
        elif text_type == "opt":
            text_config = _build(OPTConfig, text, f"{source}: text_config")
            if not text_config.do_layer_norm_before or text_config.word_embed_proj_dim != text_config.hidden_size:
                raise ConfigError(f"{source}: this OPT variant (post-LN or projected embeddings) is not supported")
        elif text_type == "t5":
            text_config = _build(T5Config, text, f"{source}: text_config")
            if text_config.feed_forward_proj != "gated-gelu":
                raise ConfigError(f"{source}: T5 feed_forward_proj {text_config.feed_forward_proj!r} is not "
                                  "supported (Flan-T5 uses 'gated-gelu')")
            # Flan-T5 (T5 v1.1) never rescales the decoder output before its head. Published files say so with
            # tie_word_embeddings=false; files saved by transformers 5 say tie_word_embeddings=true plus
            # scale_decoder_outputs=false (and store no separate lm_head: the loader then ties it).
            scaled = text.get("scale_decoder_outputs", text.get("tie_word_embeddings", True) is not False)
            if scaled:
                raise ConfigError(f"{source}: this is an original-T5 config (scaled, tied output head); "
                                  "only Flan-T5 / T5 v1.1 checkpoints are supported")
            text_config.tie_word_embeddings = False  # the head is its own module; load() ties it if not stored
        else:
            raise ConfigError(f"{source}: text_config.model_type {text_type!r} is not supported (expected 'opt' or 't5')")

        top = {k: raw[k] for k in ("num_query_tokens", "image_text_hidden_size", "image_token_index") if k in raw}
        _check_types(cls, top, source)
        return cls(vision_config=vision, qformer_config=qformer, text_config=text_config, **top)

    def to_dict(self) -> dict:
        """The config in official layout (what `config.json` holds), e.g. for saving a trained toy model."""
        out = {"model_type": "blip-2", "architectures": [self._architecture()],
               "num_query_tokens": self.num_query_tokens, "image_text_hidden_size": self.image_text_hidden_size,
               "image_token_index": self.image_token_index,
               "vision_config": {"model_type": "blip_2_vision_model", **vars(self.vision_config)},
               "qformer_config": {"model_type": "blip_2_qformer", **vars(self.qformer_config)}}
        if self.text_config is not None:
            kind = "opt" if self.use_decoder_only_language_model else "t5"
            out["text_config"] = {"model_type": kind, **vars(self.text_config)}
            out["use_decoder_only_language_model"] = self.use_decoder_only_language_model
        return out

    def _architecture(self) -> str:
        return "Blip2ForImageTextRetrieval" if self.text_config is None else "Blip2ForConditionalGeneration"


def _build(cls, section: dict | None, where: str):
    """Fill dataclass `cls` from a config.json section. Published files are terse: they list only the fields
    that differ from the reference's defaults (blip2-itm-vit-g's vision_config is just its model_type). Our
    vision and Q-Former defaults are the reference's (they are the published ViT-g and Q-Former sizes), so
    absent fields fall back to them. Language-model sizes must be written out: the reference's OPT/T5
    defaults are other models (opt-125m, t5-small) than the ones BLIP-2 uses."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: missing (a BLIP-2 config.json has vision_config, qformer_config, text_config)")
    section = dict(section)
    if "qformer_text_input" in section:  # the name older retrieval configs used
        section.setdefault("use_qformer_text_input", section.pop("qformer_text_input"))
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in section.items() if k in known}
    required = {"OPTConfig": ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size"),
                "T5Config": ("d_model", "d_ff", "num_layers", "num_heads", "vocab_size")}.get(cls.__name__, ())
    for name in required:
        if name not in kwargs:
            raise ConfigError(f"{where}: missing field {name!r}")
    for key in ("image_size", "patch_size"):  # the reference allows [h, w]; published checkpoints are square
        if isinstance(kwargs.get(key), (list, tuple)):
            h, w = kwargs[key]
            if h != w:
                raise ConfigError(f"{where}: non-square {key} {kwargs[key]} is not supported")
            kwargs[key] = h
    if kwargs.get("num_decoder_layers", 0) is None:  # T5: None means "as many as the encoder"
        kwargs["num_decoder_layers"] = kwargs["num_layers"]
    _check_types(cls, kwargs, where)
    return cls(**kwargs)


def _check_types(cls, values: dict, where: str):
    """A field of the wrong JSON type, or a size below 1, in one line here rather than deep inside torch when
    the modules are built. The type is the dataclass default's (an int where 32.0 is written is refused; a float
    field takes an int); None is left alone (some files write null for unused ids). Sizes are every int field
    but the token ids."""
    for f in fields(cls):
        value, kind = values.get(f.name), type(f.default)
        if value is None or kind not in (int, float, bool, str):
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            article = "an" if kind is int else "a"
            raise ConfigError(f"{where}: {f.name} is {value!r}, expected {article} {kind.__name__}")
        if kind is int and not f.name.endswith(("token_id", "token_index")) and value < 1:
            raise ConfigError(f"{where}: {f.name} must be at least 1, got {value}")
