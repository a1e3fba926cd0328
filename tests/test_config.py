"""Reading official config.json files, including the terse ones published on the hub, and sizing the models
they describe: the parameter counts must come out at the published sizes (built on the meta device: free)."""

import pytest
import torch

from blip2_mini import Blip2, Blip2Config
from blip2_mini.config import ConfigError

# Published text_config sections (sizes only; the files carry more fields, which are ignored).
OPT_2_7B = dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                vocab_size=50304, word_embed_proj_dim=2560, eos_token_id=50118)
OPT_6_7B = dict(model_type="opt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                vocab_size=50304, word_embed_proj_dim=4096, eos_token_id=50118)
FLAN_T5_XL = dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_heads=32, vocab_size=32128,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False)
FLAN_T5_XXL = dict(FLAN_T5_XL, d_model=4096, d_ff=10240, num_heads=64)


def published(text_config, **top):
    return {"model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"], "num_query_tokens": 32,
            "vision_config": {"model_type": "blip_2_vision_model"}, "qformer_config": {"model_type": "blip_2_qformer"},
            "text_config": text_config, **top}


def billions(config):
    with torch.device("meta"):
        model = Blip2(config)
    return sum(p.numel() for p in model.parameters()) / 1e9, model


@pytest.mark.parametrize("text, expected", [(OPT_2_7B, 3.74), (OPT_6_7B, 7.75), (FLAN_T5_XL, 3.94),
                                            (FLAN_T5_XXL, 12.23)])
def test_published_configs_give_published_sizes(text, expected):
    total, model = billions(Blip2Config.from_dict(published(text, image_token_index=50265)))
    assert total == pytest.approx(expected, abs=0.01)
    qformer = sum(p.numel() for p in model.qformer.parameters()) + model.query_tokens.numel()
    assert qformer / 1e6 == pytest.approx(105.1, abs=0.5)  # query-only Q-Former (stage-2 checkpoints)


def test_terse_retrieval_config_from_the_hub():
    # blip2-itm-vit-g-coco's config.json as published: most fields are left at the reference defaults.
    raw = {"architectures": ["Blip2ForImageTextRetrieval"], "image_text_hidden_size": 256, "model_type": "blip-2",
           "num_query_tokens": 32, "qformer_config": {"model_type": "blip_2_qformer", "qformer_text_input": True,
                                                      "vocab_size": 30523},
           "vision_config": {"image_size": 364, "model_type": "blip_2_vision_model"}}
    config = Blip2Config.from_dict(raw)
    assert config.text_config is None and config.qformer_config.use_qformer_text_input
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1408, 39)
    assert config.vision_config.image_size == 364 and config.qformer_config.encoder_hidden_size == 1408
    total, model = billions(config)
    assert total == pytest.approx(1.17, abs=0.01)
    assert model.language_model is None and model.itm_head.out_features == 2


def test_retrieval_config_with_a_default_text_config_has_no_language_model():
    raw = published({"model_type": "opt"}, architectures=["Blip2ForImageTextRetrieval"])
    assert Blip2Config.from_dict(raw).text_config is None


def test_roundtrip_through_to_dict():
    config = Blip2Config.from_dict(published(FLAN_T5_XL, image_token_index=32100))
    again = Blip2Config.from_dict(config.to_dict())
    assert again == config


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(model_type="instructblip"), "'instructblip'.*not supported"),
    (lambda c: c.pop("vision_config"), "vision_config: missing"),
    (lambda c: c["text_config"].pop("hidden_size"), "text_config: missing field 'hidden_size'"),
    (lambda c: c["text_config"].update(model_type="llama"), "'llama' is not supported"),
    (lambda c: c["text_config"].update(do_layer_norm_before=False), "post-LN"),
])
def test_unusable_configs_give_one_line_errors(mutate, message):
    raw = published(dict(OPT_2_7B))
    mutate(raw)
    with pytest.raises(ConfigError, match=message) as e:
        Blip2Config.from_dict(raw)
    assert "\n" not in str(e.value)


def test_original_t5_with_scaled_tied_head_is_refused():
    raw = published(dict(FLAN_T5_XL, tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="original-T5"):
        Blip2Config.from_dict(raw)
