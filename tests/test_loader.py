"""Loading official checkpoint layouts, strictly, and the one-line errors for every way a directory can be wrong.

The variants (.bin files, fp16 storage, LAVIS-style biases, broken files) are written at test time from the
reference-built fixture checkpoint, so the default run needs no transformers."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2_mini.loader import CheckpointError, KEY_MAP, SafetensorsFile, load_model, official_to_ours

FIXTURES = Path(__file__).parent / "fixtures" / "model"
BASE = FIXTURES / "opt-base"


def reference_logits(name="opt-base"):
    stored = load_file(FIXTURES / name / "reference.safetensors")
    return stored["input.pixel_values"], stored["input.input_ids"], stored["input.attention_mask"], \
        stored["output.logits"]


def max_logit_error(model, name="opt-base"):
    pixel_values, ids, mask, expected = reference_logits(name)
    with torch.no_grad():
        logits = model(pixel_values, ids, mask)
    return ((logits.float() - expected).abs() * mask[..., None]).max().item()


def copy_checkpoint(tmp_path, src=BASE):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_key_map_translates_every_stage():
    assert official_to_ours("vision_model.encoder.layers.12.mlp.fc1.weight") == "vision_model.layers.12.mlp.fc1.weight"
    assert official_to_ours("qformer.encoder.layer.3.crossattention.output.LayerNorm.bias") == \
        "qformer.layers.3.cross_attn.norm.bias"
    assert official_to_ours("language_model.decoder.block.5.layer.2.DenseReluDense.wo.weight") == \
        "language_model.decoder.layers.5.ffn.wo.weight"
    assert official_to_ours("language_model.encoder.block.5.layer.1.DenseReluDense.wo.weight") == \
        "language_model.encoder.layers.5.ffn.wo.weight"
    assert official_to_ours("language_model.model.decoder.layers.31.final_layer_norm.weight") == \
        "language_model.layers.31.ffn_norm.weight"
    assert official_to_ours("something.else.weight") is None
    assert len(KEY_MAP) > 50


def test_sharded_safetensors_with_index(tmp_path):
    directory = FIXTURES / "opt-odd-heads-freq3-interp"
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    load_model(directory, progress=False)  # strict: every parameter filled, nothing left over


def test_pytorch_model_bin_single_and_sharded(tmp_path):
    state = load_file(BASE / "model.safetensors")
    single = copy_checkpoint(tmp_path)
    (single / "model.safetensors").unlink()
    torch.save(state, single / "pytorch_model.bin")
    assert max_logit_error(load_model(single, progress=False)) < 1e-5

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(BASE / "config.json", sharded)
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / file)
        weight_map.update({k: file for k in keys})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert max_logit_error(load_model(sharded, progress=False)) < 1e-5


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_storage_loads_into_fp32(tmp_path, stored):
    directory = copy_checkpoint(tmp_path)
    state = {k: v.to(stored) for k, v in load_file(BASE / "model.safetensors").items()}
    save_file(state, directory / "model.safetensors")
    model = load_model(directory, dtype=torch.float32, progress=False)
    assert model.vision_model.layers[0].mlp.fc1.weight.dtype == torch.float32
    w = model.language_projection.weight
    assert torch.equal(w, state["language_projection.weight"].float())  # exactly the stored values
    assert max_logit_error(model) < 0.1 * reference_logits()[3].abs().max().item()  # rounding of the weights only


def test_dtype_policy_per_stage():
    """The paper's layout: vision and LLM in half precision, the Q-Former (and projection) in fp32."""
    policy = {"qformer": torch.float32, "query_tokens": torch.float32, "language_projection": torch.float32}
    model = load_model(BASE, dtype=torch.bfloat16, dtype_policy=policy, progress=False)
    assert model.vision_model.layers[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.qformer.layers[0].self_attn.query.weight.dtype == torch.float32
    assert model.language_projection.weight.dtype == torch.float32
    assert model.language_model.layers[0].fc1.weight.dtype == torch.bfloat16
    # the stage boundaries cast, so a mixed model runs and stays close to the fp32 reference
    assert max_logit_error(model) < 0.05 * reference_logits()[3].abs().max().item()


def test_float16_keeps_qformer_and_t5_wo_fp32_like_the_reference():
    model = load_model(FIXTURES / "t5-base", dtype=torch.float16, progress=False)
    assert model.qformer.layers[0].self_attn.query.weight.dtype == torch.float32
    assert model.query_tokens.dtype == torch.float32
    assert model.language_model.encoder.layers[0].ffn.wo.weight.dtype == torch.float32  # T5 overflows otherwise
    assert model.language_model.encoder.layers[0].ffn.wi_0.weight.dtype == torch.float16
    bf16 = load_model(FIXTURES / "t5-base", dtype=torch.bfloat16, progress=False)  # bf16 has fp32's range
    assert bf16.qformer.layers[0].self_attn.query.weight.dtype == torch.bfloat16
    assert bf16.language_model.encoder.layers[0].ffn.wo.weight.dtype == torch.bfloat16


def test_lavis_style_separate_q_and_v_biases(tmp_path):
    directory = copy_checkpoint(tmp_path)
    state = load_file(BASE / "model.safetensors")
    for key in [k for k in state if k.endswith("self_attn.qkv.bias")]:
        q, _, v = state.pop(key).chunk(3)
        state[key.replace("qkv.bias", "q_bias")] = q.clone()
        state[key.replace("qkv.bias", "v_bias")] = v.clone()
    save_file(state, directory / "model.safetensors")
    assert max_logit_error(load_model(directory, progress=False)) < 1e-5


# ---- every way a directory can be wrong: one line each -------------------------------------------------


def test_missing_directory_and_file_instead_of_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory.*weights/README.md") as e:
        load_model(tmp_path / "nope")
    one_line(e)
    with pytest.raises(CheckpointError, match="is a file") as e:
        load_model(BASE / "config.json")
    one_line(e)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json here") as e:
        load_model(tmp_path)
    one_line(e)


def test_config_of_another_architecture(tmp_path):
    directory = copy_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "instructblip"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'instructblip'.*not supported") as e:
        load_model(directory)
    one_line(e)


def test_config_missing_a_field(tmp_path):
    directory = copy_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["text_config"]["ffn_dim"]  # LM sizes must be given: the reference's OPT default is opt-125m
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="text_config: missing field 'ffn_dim'") as e:
        load_model(directory)
    one_line(e)


def test_no_weights(tmp_path):
    directory = copy_checkpoint(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found") as e:
        load_model(directory)
    one_line(e)


def test_missing_shard(tmp_path):
    directory = copy_checkpoint(tmp_path, FIXTURES / "opt-odd-heads-freq3-interp")
    next(directory.glob("model-00003-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="index names 1 shard.*not there.*model-00003") as e:
        load_model(directory)
    one_line(e)


def test_our_safetensors_reader_equals_the_safetensors_package(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "i64": torch.arange(-5, 6),
               "i8": torch.arange(-128, 128, dtype=torch.int8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    expected = load_file(tmp_path / "t.safetensors")  # the format's own reader
    file = SafetensorsFile(tmp_path / "t.safetensors")
    assert sorted(file.entries) == sorted(expected)
    for name, want in expected.items():
        got = file.tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
        file.release(name)  # dropping the pages must not break a later read (the OS reads them again)
        assert torch.equal(file.tensor(name), want), name


def test_same_dtype_weights_are_the_file_mapped_copy_on_write(tmp_path):
    """fp32 -> fp32 on the CPU copies nothing (the parameters are views of the mapped file), yet changing a
    parameter in place never writes to the checkpoint."""
    directory = copy_checkpoint(tmp_path)
    before = (directory / "model.safetensors").read_bytes()
    model = load_model(directory, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0)
    assert (directory / "model.safetensors").read_bytes() == before
    assert max_logit_error(load_model(directory, progress=False)) < 1e-5


def test_last_bytes_missing(tmp_path):
    """The header is intact but the file ends 4 bytes early: caught from the offsets, before any tensor is read."""
    directory = copy_checkpoint(tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors.*outside the file") as e:
        load_model(directory)
    one_line(e)


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_corrupt_safetensors(tmp_path, damage):
    directory = copy_checkpoint(tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + data[20:])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors.*download it again") as e:
        load_model(directory)
    one_line(e)


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    directory = copy_checkpoint(tmp_path)
    (directory / "model.safetensors").unlink()
    state = dict(load_file(BASE / "model.safetensors"))
    state["evil"] = Path("/")  # a pickled non-tensor object: weights_only refuses to unpickle it
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="other than tensors; refusing to unpickle") as e:
        load_model(directory)
    assert "weights_only" not in one_line(e)  # torch's own message suggests switching the protection off


def test_missing_unexpected_and_mismatched_keys_in_one_error(tmp_path):
    directory = copy_checkpoint(tmp_path)
    state = load_file(BASE / "model.safetensors")
    del state["qformer.layernorm.weight"]
    state["qformer.extra.weight"] = torch.zeros(3)
    state["language_projection.bias"] = torch.zeros(7)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(directory)
    message = one_line(e)
    assert str(directory) in message
    assert "1 missing (qformer.layernorm.weight)" in message
    assert "1 unexpected (qformer.extra.weight)" in message
    assert "1 shape mismatch (language_projection.bias: checkpoint (7,) vs model (32,))" in message


def test_nonzero_k_bias_is_refused(tmp_path):
    directory = copy_checkpoint(tmp_path)
    state = load_file(BASE / "model.safetensors")
    key = "vision_model.encoder.layers.0.self_attn.qkv.bias"
    state[key] = torch.ones_like(state[key])
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="k part of the fused qkv bias is not zero") as e:
        load_model(directory)
    one_line(e)


def test_progress_is_reported_on_stderr(capsys):
    load_model(BASE, progress=True)
    err = capsys.readouterr().err
    assert "loading opt-base [" in err and "GB" in err


def test_t5_head_stored_separately_or_tied(tmp_path):
    """Published Flan-T5 files store their own lm_head; files saved by transformers 5 tie it to `shared`."""
    tied = load_model(FIXTURES / "t5-base", progress=False)
    lm = tied.language_model
    assert torch.equal(lm.lm_head.weight, lm.shared.weight)

    directory = copy_checkpoint(tmp_path, FIXTURES / "t5-base")
    state = load_file(FIXTURES / "t5-base" / "model.safetensors")
    head = torch.randn_like(state["language_model.shared.weight"])
    state["language_model.lm_head.weight"] = head
    state["language_model.decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 3)
    save_file(state, directory / "model.safetensors")
    untied = load_model(directory, progress=False).language_model
    assert torch.equal(untied.lm_head.weight, head) and not torch.equal(untied.shared.weight, head)
    tokens = torch.tensor([[0, 5]])
    encoded = torch.randn(1, 3, lm.shared.embedding_dim)
    with torch.no_grad():  # the head really is the stored one: logits = decoder output @ head^T
        assert not torch.allclose(untied.decode(tokens, encoded), lm.decode(tokens, encoded))
    if "fbgemm" in torch.backends.quantized.supported_engines:  # quantized while loading: the stored head
        from blip2_mini.quantize import Fp16Linear                 # is the one kept in fp16
        packed = load_model(directory, quantize="int8", progress=False).language_model.lm_head
        x = torch.randn(2, head.shape[1])
        assert isinstance(packed, Fp16Linear) and torch.equal(packed(x), Fp16Linear(head)(x))


@pytest.mark.parametrize("mode, activations", [("int8", "float"), ("int8-dynamic", "int8")])
@pytest.mark.parametrize("name", ["opt-base", "t5-base"])
def test_quantize_while_loading_equals_quantizing_after(mode, activations, name):
    """load_model(quantize=...) rounds each Linear weight as it is read; the model is the very same as
    quantizing the float model afterwards (same int8 values, same scales, same logits), without the float copy."""
    from blip2_mini.quantize import Int8Linear, quantize_language_model
    while_loading = load_model(FIXTURES / name, quantize=mode, progress=False)
    after = quantize_language_model(load_model(FIXTURES / name, progress=False), activations)
    ours = dict(while_loading.named_modules())
    int8 = [n for n, m in after.named_modules() if isinstance(m, Int8Linear)]
    assert int8 and all(isinstance(ours[n], Int8Linear) for n in int8)
    assert [n for n, m in while_loading.named_modules() if isinstance(m, Int8Linear)] == int8
    for a, b in zip(while_loading.state_dict().values(), after.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for n in int8:  # fbgemm's packed copies (int8-dynamic) are not in the state dict: unpack and compare
        if after.get_submodule(n).packed is not None:
            unpack = lambda m: torch.ops.quantized.linear_unpack(m.packed)[0].int_repr()  # noqa: E731
            assert torch.equal(unpack(ours[n]), unpack(after.get_submodule(n)))
    pixel_values, ids, mask, _ = reference_logits(name) if name == "opt-base" else (None,) * 4
    if name == "opt-base":
        with torch.no_grad():
            assert torch.equal(while_loading(pixel_values, ids, mask), after(pixel_values, ids, mask))


def test_quantize_option_errors(tmp_path):
    with pytest.raises(ValueError, match="quantize must be one of int8, int8-dynamic"):
        load_model(BASE, quantize="int4", progress=False)
    with pytest.raises(ValueError, match="for CPUs"):
        load_model(BASE, quantize="int8", device="meta", progress=False)
    with pytest.raises(CheckpointError, match="no language model"):
        load_model(FIXTURES / "itm-base", quantize="int8", progress=False)


# ---- impossible options, and damage that is not a missing or misshapen tensor -----------------------------


@pytest.mark.parametrize("options, message", [
    ({"dtype": torch.int8}, 'dtype must be a float dtype .* got torch.int8; for int8 weights use quantize="int8"'),
    ({"dtype": "float8"}, "dtype must be a float dtype"),
    ({"dtype_policy": torch.bfloat16}, "dtype_policy must be a dict"),
    ({"dtype_policy": {"vision_model": torch.int64}}, r"dtype_policy\['vision_model'\] must be a float dtype"),
    ({"dtype_policy": {"vision": torch.bfloat16}}, "dtype_policy: 'vision' matches no parameter.*vision_model"),
    ({"quantize": ["int8"]}, "quantize must be one of"),
    ({"device": "gpu"}, "device 'gpu' is not a torch device"),
])
def test_impossible_options_are_one_line(options, message):
    with pytest.raises(ValueError, match=message) as e:
        load_model(BASE, progress=False, **options)
    one_line(e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(ValueError, match="no CUDA device here") as e:
        load_model(BASE, device="cuda", progress=False)
    one_line(e)


def test_dtype_by_name_like_transformers():
    model = load_model(BASE, dtype="bfloat16", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_untied_opt_head_is_loaded(tmp_path):
    # An OPT whose config unties the output head stores it; here it holds the embedding's values, so the
    # logits are the reference's, computed through a head of its own.
    directory = copy_checkpoint(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = False
    (directory / "config.json").write_text(json.dumps(config))
    state = load_file(BASE / "model.safetensors")
    state["language_model.lm_head.weight"] = state["language_model.model.decoder.embed_tokens.weight"].clone()
    save_file(state, directory / "model.safetensors")
    model = load_model(directory, progress=False)
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() != lm.embed_tokens.weight.data_ptr()
    assert max_logit_error(model) < 1e-5


def test_a_single_safetensors_file_outranks_a_bin_index(tmp_path):
    # transformers' order: model.safetensors, its index, pytorch_model.bin, its index. A download of only the
    # safetensors file next to a stray .bin index must load.
    directory = copy_checkpoint(tmp_path)
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"query_tokens": "pytorch_model-00001-of-00002.bin"}}))
    assert max_logit_error(load_model(directory, progress=False)) < 1e-5


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_weights(directory, edit):
    state = dict(load_file(directory / "model.safetensors"))
    edit(state)
    save_file(state, directory / "model.safetensors")


DAMAGE = {
    "integer weight": (lambda d: _edit_weights(d, lambda s: s.update(
        {"language_projection.weight": s["language_projection.weight"].long()})),
        r"language_projection.weight: stored as torch.int64, expected a dense float tensor"),
    "qkv_bias false, biases stored": (lambda d: _edit_config(d, lambda c: c["vision_config"].update(qkv_bias=False)),
                                      r"unexpected \(vision_model.encoder.layers.0.self_attn.qkv.bias"),
    "config is a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: not a JSON object"),
    "size is a string": (lambda d: _edit_config(d, lambda c: c["vision_config"].update(hidden_size="32")),
                         "vision_config: hidden_size is '32', expected an int"),
    "zero frequency": (lambda d: _edit_config(d, lambda c: c["qformer_config"].update(cross_attention_frequency=0)),
                       "qformer_config: cross_attention_frequency must be at least 1, got 0"),
    "heads do not divide": (lambda d: _edit_config(d, lambda c: c["vision_config"].update(num_attention_heads=5)),
                            "config.json: vision: hidden_size 32 is not divisible by num_attention_heads 5"),
    "Q-Former activation": (lambda d: _edit_config(d, lambda c: c["qformer_config"].update(hidden_act="relu")),
                            "Q-Former: hidden_act 'relu' is not supported"),
    "header is a list": (lambda d: (d / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]"),
                         "header is not a JSON object"),
    "bin holds a list": (lambda d: ((d / "model.safetensors").unlink(), torch.save([1, 2], d / "pytorch_model.bin")),
                         "pytorch_model.bin: not a state dict"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_malformed_checkpoint_is_one_checkpoint_error(tmp_path, damage):
    directory = copy_checkpoint(tmp_path)
    make, message = DAMAGE[damage]
    make(directory)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(directory, progress=False)
    one_line(e)


def test_weight_map_of_the_wrong_shape(tmp_path):
    directory = copy_checkpoint(tmp_path, FIXTURES / "opt-odd-heads-freq3-interp")
    (directory / "model.safetensors.index.json").write_text('{"weight_map": null}')
    with pytest.raises(CheckpointError, match="not a valid index file") as e:
        load_model(directory, progress=False)
    one_line(e)
