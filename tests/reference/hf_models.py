"""Build random-weight reference BLIP-2 models with `transformers` and record what each stage computes.

Used by the fixture builder (build_fixtures.py) and by the live reference tests. Only this directory and the
live tests import `transformers`; blip2_mini itself never does.

Random weights from the reference's default initialisation (std 0.02, zero query tokens, ...) make tiny
models output near-uniform logits that cannot tell two implementations apart, so `scale_weights` redraws every
tensor with a spread that keeps activations O(1): matrices ~ N(0, 1/fan_in), vectors (biases, norms) around
their natural value. The vision fused qkv bias keeps zeros in its k part, as the published checkpoints do.
"""

import torch

import transformers
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from hf_models_cases import GENERATION_CASES, split_case  # noqa: F401  (GENERATION_CASES: for the fixture builder)

REFERENCE_VERSION = transformers.__version__


def make_config(family="opt", *, vision_width=32, vision_layers=2, vision_heads=4, image_size=28, patch_size=14,
                qformer_width=32, qformer_layers=2, qformer_heads=4, cross_attention_frequency=2,
                num_query_tokens=4, lm_width=32, lm_layers=2, lm_heads=4, vocab_size=96, image_token_index=90,
                d_kv=None, qformer_vocab=64, eos_token_id=None) -> Blip2Config:
    """A small BLIP-2 config of the given family: "opt", "t5" or "itm" (retrieval, no language model);
    eos_token_id replaces the family's end token (OPT 2, T5 1)."""
    vision = dict(hidden_size=vision_width, intermediate_size=2 * vision_width + 6, num_hidden_layers=vision_layers,
                  num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size)
    qformer = dict(hidden_size=qformer_width, num_hidden_layers=qformer_layers, num_attention_heads=qformer_heads,
                   intermediate_size=2 * qformer_width + 10, cross_attention_frequency=cross_attention_frequency,
                   vocab_size=qformer_vocab, max_position_embeddings=40, use_qformer_text_input=family == "itm")
    if family == "opt":
        text = dict(model_type="opt", hidden_size=lm_width, num_hidden_layers=lm_layers, num_attention_heads=lm_heads,
                    ffn_dim=2 * lm_width + 4, vocab_size=vocab_size, max_position_embeddings=64,
                    word_embed_proj_dim=lm_width, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    elif family == "t5":
        text = dict(model_type="t5", d_model=lm_width, d_kv=d_kv or lm_width // lm_heads, d_ff=2 * lm_width + 4,
                    num_layers=lm_layers, num_decoder_layers=lm_layers, num_heads=lm_heads, vocab_size=vocab_size,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, relative_attention_num_buckets=8, relative_attention_max_distance=20)
    elif family == "itm":
        text = None
    else:
        raise ValueError(family)
    if eos_token_id is not None:
        text["eos_token_id"] = eos_token_id
    kwargs = dict(vision_config=vision, qformer_config=qformer, num_query_tokens=num_query_tokens,
                  image_token_index=image_token_index, image_text_hidden_size=24)
    if text is not None:
        kwargs["text_config"] = text
    return Blip2Config(**kwargs)


@torch.no_grad()
def scale_weights(model: torch.nn.Module, seed: int):
    """Redraw all weights so that a tiny random model has O(1) activations and decisive logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "embed" not in name and "query_tokens" not in name and "shared" not in name \
                and "relative_attention_bias" not in name:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        elif p.ndim >= 2 or "class_embedding" in name:  # embeddings, query tokens, position tables
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        elif name.endswith("qkv.bias"):
            D = p.shape[0] // 3
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            p[D:2 * D] = 0  # the k part is zero in every published checkpoint
        elif "norm" in name.lower() and name.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:  # biases
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    _make_language_model_decisive(model, g)
    return model


@torch.no_grad()
def _make_language_model_decisive(model, g):
    """Random tiny LMs tend to repeat one token forever, which lets a wrong decoder pass a token-equality test.
    OPT's tied head favours copying its input token: small token embeddings and large position embeddings make
    the argmax move with the position. T5 has no position embeddings; a larger gain on its matrices and a strong
    relative-position table do the same (checked: several distinct tokens per generated row)."""
    for name, p in model.named_parameters():
        if not name.startswith("language_model."):
            continue
        if "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        elif "embed_positions" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
        elif "shared" in name or "relative_attention_bias" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.ndim >= 2 and ".block." in name:  # T5's linear layers
            p.mul_(3.0)


def build_reference(config: Blip2Config, seed: int = 0):
    """A reference model with scaled random weights: retrieval (ITM/ITC) when the Q-Former has text input."""
    torch.manual_seed(seed)
    if config.qformer_config.use_qformer_text_input:
        return scale_weights(Blip2ForImageTextRetrieval(config).eval(), seed)
    model = scale_weights(Blip2ForConditionalGeneration(config).eval(), seed)
    if config.text_config.model_type == "opt":  # published OPT heads are tied to the input embedding
        model.language_model.lm_head.weight = model.language_model.model.decoder.embed_tokens.weight
    return model


@torch.no_grad()
def reference_stages(model, pixel_values, input_ids=None, attention_mask=None, decoder_input_ids=None,
                     interpolate_pos_encoding=False) -> dict:
    """Every stage's output of a reference Blip2ForConditionalGeneration, by name (plain tensors)."""
    out = {}
    vision = model.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                output_hidden_states=True, return_dict=True)
    out["patch_embeddings"] = vision.hidden_states[0]
    for i, h in enumerate(vision.hidden_states[1:]):
        out[f"vision_layer_{i}"] = h
    out["image_embeds"] = vision.last_hidden_state
    query_tokens = model.query_tokens.expand(pixel_values.shape[0], -1, -1)
    q = model.qformer(query_embeds=query_tokens, encoder_hidden_states=vision.last_hidden_state,
                      output_hidden_states=True, return_dict=True)
    for i, h in enumerate(q.hidden_states[1:]):
        out[f"qformer_layer_{i}"] = h
    out["query_output"] = q.last_hidden_state
    if not hasattr(model, "language_projection"):
        return out
    out["projection"] = model.language_projection(q.last_hidden_state)
    lm_out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                   decoder_input_ids=decoder_input_ids, interpolate_pos_encoding=interpolate_pos_encoding,
                   return_dict=True)
    out["logits"] = lm_out.logits
    if decoder_input_ids is not None:
        out["t5_encoder_output"] = lm_out.language_model_outputs.encoder_last_hidden_state
    return out


def prompt_ids(config, batch: int, lengths, seed: int):
    """Random prompts in the processor's layout: Q <image> tokens, left padding, BOS (OPT), text.
    Returns input_ids and attention_mask (B, Q + max(lengths) [+1 for BOS])."""
    g = torch.Generator().manual_seed(seed)
    Q, img = config.num_query_tokens, config.image_token_index
    is_opt = config.text_config.model_type == "opt"
    V = config.text_config.vocab_size
    rows, masks = [], []
    longest = max(lengths) + (1 if is_opt else 0)
    for n in lengths:
        text = torch.randint(4, img - 1, (n,), generator=g).tolist()
        if is_opt:
            text = [config.text_config.bos_token_id] + text
        else:
            text = text + [config.text_config.eos_token_id]
        pad = (longest + (0 if is_opt else 1)) - len(text)
        pad_id = config.text_config.pad_token_id
        if is_opt:  # left padding between the image tokens and BOS, as the reference processor writes it
            rows.append([img] * Q + [pad_id] * pad + text)
            masks.append([1] * Q + [0] * pad + [1] * len(text))
        else:  # T5 is an encoder: right padding
            rows.append([img] * Q + text + [pad_id] * pad)
            masks.append([1] * Q + [1] * len(text) + [0] * pad)
    assert max(max(r) for r in rows) < V
    return torch.tensor(rows), torch.tensor(masks)


@torch.no_grad()
def reference_generate(model, pixel_values, input_ids, attention_mask, case: dict) -> torch.Tensor:
    """The reference's generate() as a user calls it (what the case leaves out is the reference's default),
    returning only the new tokens: the reference returns the prompt ids first for OPT and the decoder start token
    first for T5."""
    prompt, seed, kwargs = split_case(case)
    text = model.config.text_config
    if not prompt:
        input_ids = attention_mask = None
        if text.model_type == "t5":
            # The reference cannot caption without a prompt for T5 (it looks for a BOS id T5 lacks), so give it
            # what its processor writes for an empty text: the image tokens and T5's EOS.
            Q = model.config.num_query_tokens
            input_ids = torch.tensor([[model.config.image_token_index] * Q + [text.eos_token_id]])
            input_ids = input_ids.expand(pixel_values.shape[0], -1)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if text.model_type == "t5":
        return out[:, 1:]
    prompt_length = input_ids.shape[1] if input_ids is not None else model.config.num_query_tokens + 1
    return out[:, prompt_length:]
