"""Retrieval with the stage-1 checkpoints (ITC / ITM), pinned to the reference.

Fixtures (tests/fixtures/retrieval, built by tests/reference/build_retrieval_fixtures.py):
  * model level: `image_embeds`, `text_embeds`, `itc`, `itm` against Blip2VisionModelWithProjection,
    Blip2TextModelWithProjection and Blip2ForImageTextRetrieval (without / with the ITM head), with the text
    in both layouts (plain tokenizer ids, and the processor's with `<image>` ids first), fp32 within 1e-5;
  * pipeline level: `match_scores`, `rank_images` and the `match` / `rank` commands on a small retrieval
    checkpoint with its tokenizer and processor, against the numbers of the reference processor + model.
Live (`pytest --live`): the model level at fresh random configurations.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2_mini.loader import load_model
from blip2_mini.retrieval import match_scores, rank_images, retrieve

FIXTURES = Path(__file__).parent / "fixtures" / "retrieval"
CHECKPOINT = FIXTURES / "checkpoint"
GALLERY = FIXTURES / "gallery"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
ATOL = 1e-5


def stored(case):
    tensors = load_file(FIXTURES / "reference.safetensors")
    inputs = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{case}.input.")}
    outputs = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{case}.output.")}
    return inputs, outputs


def processor_layout(input_ids, attention_mask, num_query_tokens, image_token_index):
    """Plain ids -> the layout Blip2Processor writes with images and text (the fixture builder checks this
    against the reference processor): Q `<image>` ids in front, always attended."""
    B = input_ids.shape[0]
    ids = torch.cat([torch.full((B, num_query_tokens), image_token_index), input_ids], dim=1)
    mask = torch.cat([torch.ones(B, num_query_tokens, dtype=attention_mask.dtype), attention_mask], dim=1)
    return ids, mask


@torch.no_grad()
def our_outputs(model, pixel_values, input_ids, attention_mask, image_token_index=None) -> dict:
    """blip2_mini's side of build_retrieval_fixtures.reference_outputs, under the same names."""
    out = {"image_embeds": model.image_embeds(pixel_values),
           "text_embeds": model.text_embeds(input_ids, attention_mask),
           "itc_plain": model.itc(pixel_values, input_ids, attention_mask),
           "itm_plain": model.itm(pixel_values, input_ids, attention_mask)}
    if image_token_index is not None:
        ids, mask = processor_layout(input_ids, attention_mask, model.config.num_query_tokens, image_token_index)
        out["itc_processor"] = model.itc(pixel_values, ids, mask)
        out["itm_processor"] = model.itm(pixel_values, ids, mask)
        out["itm_one_image"] = model.itm(pixel_values[:1], ids, mask)  # one image, scored against every text
    return out


def assert_outputs_match(ours: dict, reference: dict, atol=ATOL) -> dict:
    assert set(ours) == set(reference), (set(ours), set(reference))
    worst = {}
    for name, ref in reference.items():
        assert ours[name].shape == ref.shape, f"{name}: {tuple(ours[name].shape)} vs reference {tuple(ref.shape)}"
        worst[name] = (ours[name].float() - ref.float()).abs().max().item()
        assert worst[name] <= atol, f"{name}: max abs diff {worst[name]:.3g} > {atol}"
    return worst


@pytest.fixture(scope="module")
def checkpoint_model():
    return load_model(CHECKPOINT, progress=False)


@pytest.fixture(scope="module")
def pipeline():
    from blip2_mini import load

    return load(CHECKPOINT, progress=False)


def gallery():
    from blip2_mini.processing import load_image

    return [(path, load_image(path)) for path in sorted(GALLERY.iterdir())]


# ---- the model methods against the reference (fixtures) --------------------------------------------------


@pytest.mark.parametrize("case", ["checkpoint", "odd"])
def test_model_methods_match_reference(case):
    """checkpoint: config with image_token_index, texts from the trained tokenizer, both layouts.
    odd: head size 10, cross-attention every 3rd of 4 layers, 5 queries, no image_token_index, padded batch of 3."""
    inputs, reference = stored(case)
    meta = REFERENCE["cases"][case]
    model = load_model(FIXTURES / meta["directory"], progress=False)
    assert model.config.image_token_index == meta["image_token_index"]
    worst = assert_outputs_match(our_outputs(model, **inputs, image_token_index=meta["image_token_index"]), reference)
    assert len(worst) == (7 if meta["image_token_index"] is not None else 4)


def test_processor_layout_and_plain_layout_agree(checkpoint_model):
    """Stripping the `<image>` slots is all the processor layout changes: the reference's own numbers agree
    across layouts, and so do ours, for ITC and ITM."""
    _, reference = stored("checkpoint")
    assert torch.allclose(reference["itc_processor"], reference["itc_plain"], atol=1e-6)
    assert torch.allclose(reference["itm_processor"], reference["itm_plain"], atol=1e-6)
    assert reference["itm_plain"].softmax(-1)[:, 1].std() > 0.01  # the pairs are told apart: a real test


def test_text_embeds_ignore_processor_image_slots(checkpoint_model):
    inputs, reference = stored("checkpoint")
    image_id = checkpoint_model.config.image_token_index
    ids, mask = processor_layout(inputs["input_ids"], inputs["attention_mask"], 4, image_id)
    with torch.no_grad():
        got = checkpoint_model.text_embeds(ids, mask)
    assert (got - reference["text_embeds"]).abs().max() <= ATOL


# ---- errors ----------------------------------------------------------------------------------------------


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and message, message
    return message


def test_empty_text_is_refused(checkpoint_model):
    m, image_id = checkpoint_model, checkpoint_model.config.image_token_index
    pixel_values = torch.zeros(1, 3, 28, 28)
    for ids, mask in [(torch.zeros(1, 0, dtype=torch.long), None),  # no tokens at all
                      (torch.full((1, 4), image_id), None),  # processor layout with nothing after the image slots
                      (torch.tensor([[2, 5, 3], [0, 0, 0]]), torch.tensor([[1, 1, 1], [0, 0, 0]]))]:  # all padding
        for call in (lambda: m.text_embeds(ids, mask), lambda: m.itc(pixel_values, ids, mask),
                     lambda: m.itm(pixel_values, ids, mask)):
            with pytest.raises(ValueError) as excinfo:
                call()
            assert "empty text" in one_line_error(excinfo)


def test_text_longer_than_position_table_is_refused(checkpoint_model):
    table = checkpoint_model.qformer.embeddings.position_embeddings.num_embeddings  # 40 in the fixture
    ids = torch.full((1, table + 1), 7)
    m = checkpoint_model
    for call in (lambda: m.text_embeds(ids), lambda: m.itm(torch.zeros(1, 3, 28, 28), ids)):
        with pytest.raises(ValueError) as excinfo:
            call()
        assert "position table" in one_line_error(excinfo) and str(table) in str(excinfo.value)
    with torch.no_grad():
        checkpoint_model.text_embeds(ids[:, :table])  # exactly the table's length is fine


def test_itm_batch_sizes_must_match(checkpoint_model):
    ids = torch.tensor([[2, 5, 3]] * 3)
    with pytest.raises(ValueError) as excinfo:
        checkpoint_model.itm(torch.zeros(2, 3, 28, 28), ids)
    assert "2 images but 3 texts" in one_line_error(excinfo)
    with pytest.raises(ValueError, match="attention_mask"):
        checkpoint_model.itm(torch.zeros(3, 3, 28, 28), ids, torch.ones(3, 4, dtype=torch.long))


def test_ids_outside_the_vocabulary_are_refused(checkpoint_model):
    V, image_id = 800, checkpoint_model.config.image_token_index
    with pytest.raises(ValueError) as excinfo:
        checkpoint_model.text_embeds(torch.tensor([[2, V + 5, 3]]))
    assert "outside the Q-Former vocabulary (0..799)" in one_line_error(excinfo)
    with pytest.raises(ValueError) as excinfo:  # `<image>` ids that are not the Q leading slots
        checkpoint_model.text_embeds(torch.tensor([[2, 5, 3, image_id, image_id, image_id, image_id]]))
    assert "must all come first" in one_line_error(excinfo)


def test_stage2_checkpoint_has_no_retrieval():
    model = load_model(Path(__file__).parent / "fixtures" / "model" / "opt-base", progress=False)
    with pytest.raises(ValueError, match="Q-Former text weights"):
        model.text_embeds(torch.tensor([[2, 5, 3]]))


def test_retrieval_functions_refuse_bad_input(pipeline):
    model, processor = pipeline
    image = gallery()[0][1]
    for texts in ([], [""], ["a dog", "   "]):
        with pytest.raises(ValueError) as excinfo:
            match_scores(model, processor, image, texts)
        one_line_error(excinfo)
    with pytest.raises(ValueError, match="position table"):
        match_scores(model, processor, image, ["dog " * 60])
    with pytest.raises(ValueError, match="empty text"):
        rank_images(model, processor, gallery(), " ")
    with pytest.raises(ValueError, match="no images"):
        rank_images(model, processor, [], "a dog")
    with pytest.raises(ValueError, match="k must be at least 1"):
        retrieve(torch.tensor([0.1, 0.2]), lambda idx: torch.zeros(len(idx), 2), k=0)


# ---- the retrieval recipe --------------------------------------------------------------------------------


def test_retrieve_reranks_the_itc_short_list_by_itm_logit_plus_itc():
    """LAVIS `compute_sim_matrix`: ITC top k, then score = ITM match logit + ITC. Hand-computed:
    ITC top 3 = [4, 1, 2] (0.9, 0.8, 0.7); match logits 0.0, 0.5, 0.05 -> scores 0.9, 1.3, 0.75 -> [1, 4, 2].
    Candidate 0 has the best ITM logit of all but is outside the short list, so it is never looked at."""
    itc = torch.tensor([0.1, 0.8, 0.7, 0.2, 0.9])
    match_logit = torch.tensor([5.0, 0.5, 0.05, 0.0, 0.0])
    seen = []

    def itm_fn(candidates):
        seen.append(candidates.tolist())
        return torch.stack([torch.zeros(len(candidates)), match_logit[candidates]], dim=1)  # [no match, match]

    order, scores, logits = retrieve(itc, itm_fn, k=3)
    assert seen == [[4, 1, 2]]
    assert order.tolist() == [1, 4, 2]
    assert torch.allclose(scores, torch.tensor([1.3, 0.9, 0.75]))
    assert logits[:, 1].tolist() == pytest.approx([0.5, 0.0, 0.05])
    order, _, _ = retrieve(itc, itm_fn, k=10)  # k larger than the gallery: everything is re-ranked
    assert order.tolist()[0] == 0 and len(order) == 5


def test_match_scores_match_the_reference_pipeline(pipeline):
    """Our processor, tokenizer and model against the reference processor and model on the same image."""
    model, processor = pipeline
    expected = REFERENCE["match"]
    image = dict((p.name, im) for p, im in gallery())[expected["image"]]
    results = match_scores(model, processor, image, expected["texts"])
    assert [text for text, _, _ in results] == expected["texts"]
    for (_, itm, itc), ref_itm, ref_itc in zip(results, expected["itm_probability"], expected["itc"]):
        assert abs(itm - ref_itm) <= ATOL and abs(itc - ref_itc) <= ATOL


def test_rank_images_follows_the_recipe_like_the_reference(pipeline):
    model, processor = pipeline
    expected = REFERENCE["rank"]
    progress = []
    results = rank_images(model, processor, gallery(), expected["query"], top_k=expected["top_k"], batch_size=2,
                          on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(2, 5), (4, 5), (5, 5)]
    assert [path.name for path, _, _ in results] == [name for name, _, _ in expected["ranked"]]
    assert [path.name for path, _, _ in results] != expected["itc_order"]  # the ITM re-ranking moved something
    for (_, itc, itm), (_, ref_itc, ref_itm) in zip(results, expected["ranked"]):
        assert abs(itc - ref_itc) <= ATOL and abs(itm - ref_itm) <= ATOL


def test_rank_and_match_report_the_same_scores(pipeline):
    """The ITC of a ranked image is the one `match` gives that image with the query (same model calls)."""
    model, processor = pipeline
    query = REFERENCE["rank"]["query"]
    images = gallery()
    ranked = rank_images(model, processor, images, query, top_k=5, batch_size=3)
    by_path = dict(images)
    for path, itc, itm in ranked:
        ((_, itm_m, itc_m),) = match_scores(model, processor, by_path[path], [query])
        assert abs(itc - itc_m) < 1e-6 and abs(itm - itm_m) < 1e-6
        assert abs(itc - REFERENCE["rank"]["all_itc"][path.name]) <= ATOL


# ---- command line ----------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    from blip2_mini.__main__ import main

    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_match_command_prints_the_api_numbers(capsys, pipeline):
    model, processor = pipeline
    expected = REFERENCE["match"]
    image_path = GALLERY / expected["image"]
    status, out, _ = run_cli(capsys, "match", image_path, *expected["texts"], "--weights", CHECKPOINT)
    assert status == 0
    lines = out.strip().splitlines()
    api = match_scores(model, processor, gallery()[0][1], expected["texts"])
    assert len(lines) == len(api)
    for line, (text, itm, itc), ref_itm in zip(lines, api, expected["itm_probability"]):
        m = re.fullmatch(r"ITM (\S+)  ITC (\S+)  (.*)", line)
        assert m, line
        assert m.group(1) == f"{itm:.4f}" and m.group(2) == f"{itc:+.4f}" and m.group(3) == text
        assert abs(float(m.group(1)) - ref_itm) <= 5e-5 + ATOL  # 4 printed decimals


def test_rank_command_prints_the_api_ranking(capsys, pipeline):
    model, processor = pipeline
    expected = REFERENCE["rank"]
    status, out, err = run_cli(capsys, "rank", GALLERY, expected["query"], "--weights", CHECKPOINT,
                               "--top-k", expected["top_k"], "--batch-size", 2)
    assert status == 0
    assert "embedding images" in err and "5/5" in err  # progress on stderr, results alone on stdout
    api = rank_images(model, processor, gallery(), expected["query"], top_k=expected["top_k"])
    lines = out.strip().splitlines()
    assert len(lines) == expected["top_k"]
    for rank, (line, (path, itc, itm)) in enumerate(zip(lines, api), 1):
        m = re.fullmatch(r"\s*(\d+)\. ITM (\S+)  ITC (\S+)  (.*)", line)
        assert m, line
        assert (int(m.group(1)), m.group(2), m.group(3), m.group(4)) == (rank, f"{itm:.4f}", f"{itc:+.4f}", str(path))


def test_rank_command_errors(capsys, tmp_path):
    status, _, err = run_cli(capsys, "rank", tmp_path / "nowhere", "a dog", "--weights", CHECKPOINT)
    assert status == 2 and "not a directory" in err
    status, _, err = run_cli(capsys, "rank", tmp_path, "a dog", "--weights", CHECKPOINT)
    assert status == 2 and f"no images (.bmp .gif .jpeg .jpg .png .tif .tiff .webp) found in {tmp_path}" in err


def test_match_command_bad_text_is_a_one_line_error(capsys):
    status, _, err = run_cli(capsys, "match", GALLERY / "image0.png", "a dog", "", "--weights", CHECKPOINT)
    assert status == 2 and err.startswith("error: ") and "empty text" in err and err.count("\n") == 1


def test_bfloat16_scores_stay_close_to_the_reference():
    """bf16 everywhere (8-bit mantissa): the pipeline numbers within a bf16-sized tolerance of the fp32 reference."""
    from blip2_mini import load

    model, processor = load(CHECKPOINT, dtype=torch.bfloat16, progress=False)
    expected = REFERENCE["match"]
    results = match_scores(model, processor, gallery()[0][1], expected["texts"])
    for (_, itm, itc), ref_itm, ref_itc in zip(results, expected["itm_probability"], expected["itc"]):
        assert abs(itm - ref_itm) < 0.01 and abs(itc - ref_itc) < 0.01


# ---- live: fresh random configurations against the reference ---------------------------------------------

LIVE_CONFIGS = {
    # id: (make_config overrides, token counts of the texts (batch, padded), image size)
    "freq1-heads1-q1-batch2-padded": (dict(cross_attention_frequency=1, qformer_heads=1, num_query_tokens=1),
                                      [3, 1], 28),
    "freq2-width40-heads5-q7-batch3-padded": (dict(qformer_width=40, qformer_heads=5, num_query_tokens=7),
                                              [1, 6, 3], 28),
    "freq3-layers4-heads3-q5-224px-batch2": (dict(cross_attention_frequency=3, qformer_layers=4, qformer_width=30,
                                                  qformer_heads=3, num_query_tokens=5, image_size=224,
                                                  vision_width=24, vision_heads=6), [8, 2], 224),
    "freq2-no-image-token-batch4-padded": (dict(image_token_index=None), [2, 2, 5, 1], 28),
    "freq2-text-fills-position-table": (dict(num_query_tokens=3), [38, 4], 28),  # 38 + [CLS] + [SEP] = 40 positions
}


@pytest.mark.live
@pytest.mark.parametrize("config_id", list(LIVE_CONFIGS))
def test_model_methods_match_live_reference(config_id, tmp_path):
    pytest.importorskip("transformers")
    from build_retrieval_fixtures import random_texts, reference_outputs
    from hf_models import build_reference, make_config

    overrides, lengths, size = LIVE_CONFIGS[config_id]
    vocab = 100
    # `<image>` gets the id right after the Q-Former vocabulary, as in the published checkpoint
    overrides = {"qformer_vocab": vocab, "image_token_index": vocab, **overrides}
    config = make_config("itm", **overrides)
    build_reference(config, seed=sum(map(ord, config_id))).save_pretrained(tmp_path)
    input_ids, attention_mask = random_texts(lengths, vocab, seed=len(config_id))
    pixel_values = torch.randn(len(lengths), 3, size, size, generator=torch.Generator().manual_seed(1))
    image_token_index = config.image_token_index
    reference = reference_outputs(tmp_path, pixel_values, input_ids, attention_mask, image_token_index)
    model = load_model(tmp_path, progress=False)
    assert_outputs_match(our_outputs(model, pixel_values, input_ids, attention_mask, image_token_index), reference)


SHIPPED_ITM = Path(__file__).resolve().parents[1] / "weights" / "blip2-shapes-tiny-itm"


@pytest.mark.skipif(not (SHIPPED_ITM / "config.json").exists(), reason="no shipped retrieval model")
def test_a_texts_scores_do_not_depend_on_the_other_texts_in_the_batch():
    # The shipped model's tokenizer is byte-level BPE (padded on the left for OPT); retrieval reads each text's
    # first token, so its texts must be padded on the right, and processor-layout <image> slots must be known.
    from blip2_mini import load

    model, processor = load(SHIPPED_ITM, progress=False)
    image = gallery()[0][1]
    texts = ["a red circle", "a small blue square at the top and a large green cross on the left"]
    together = match_scores(model, processor, image, texts)
    alone = [match_scores(model, processor, image, [t])[0] for t in texts]
    for (text, itm, itc), (_, itm1, itc1) in zip(together, alone):
        assert abs(itm - itm1) < 1e-5 and abs(itc - itc1) < 1e-5, text
    enc = processor(images=[image, image], text=texts)  # processor layout: Q <image> slots, then the text
    plain = processor.tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.allclose(model.itc(enc["pixel_values"], enc["input_ids"], enc["attention_mask"]),
                          model.itc(enc["pixel_values"], plain["input_ids"], plain["attention_mask"]), atol=1e-6)


def test_left_padded_text_is_refused(checkpoint_model):
    ids = torch.tensor([[101, 2000, 102], [0, 101, 102]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match="left-padded text.*pad on the right") as e:
        checkpoint_model.text_embeds(ids, mask)
    one_line_error(e)


def test_images_must_be_name_image_pairs(pipeline):
    model, processor = pipeline
    with pytest.raises(ValueError, match=r"images must be \(name, image\) pairs"):
        rank_images(model, processor, [gallery()[0][1]], "a dog")


def test_a_retrieval_checkpoint_has_nothing_to_project_into(checkpoint_model):
    with pytest.raises(ValueError, match="project: a retrieval checkpoint has no language model") as e:
        checkpoint_model.image_prompt(torch.zeros(1, 3, 28, 28))
    one_line_error(e)
