"""The toy pre-training (blip2_mini/pretrain/): each stage trains, the stage-1 masks are where the paper puts
them, the export is the loader's exact inverse, and the shipped model's measured quality reproduces.

Training tests use a model far smaller than the shipped one (width 32, one or two layers) and a few dozen
images, so the whole file runs in seconds on a CPU.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from blip2_mini.data.shapes import ShapesDataset, all_texts, caption, parse_caption, questions, vqa_text
from blip2_mini.loader import CheckpointError, load_model
from blip2_mini.model import Blip2
from blip2_mini.pretrain import evaluate as evaluate_module
from blip2_mini.pretrain.common import adamw, pixel_values
from blip2_mini.pretrain.evaluate import (evaluate_generation, evaluate_retrieval, lm_answering_accuracy,
                                          lm_restating_accuracy, token_position_probe)
from blip2_mini.pretrain.export import official_state_dict, ours_to_official, save_generation_model, save_retrieval_model
from blip2_mini.pretrain.frozen import (CellHead, cell_labels, init_weights, paired_documents, pretrain_language_model,
                                        pretrain_vision, toy_config, train_tokenizer)
from blip2_mini.pretrain.stage1 import Stage1Model, negative_weights, qformer_text, train_stage1
from blip2_mini.pretrain.stage2 import train_stage2
from blip2_mini.tokenizer import load_tokenizer

SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "blip2-shapes-tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread (several threads only add synchronisation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """24 training scenes, their pixels and captions, and a BPE tokenizer trained on their text."""
    torch.manual_seed(0)
    ds = ShapesDataset("train", n=24, seed=0, image_size=72)
    tok_dir = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_tokenizer(list(all_texts(300, 0)), tok_dir, vocab_size=400)
    return dict(ds=ds, pixels=pixel_values(ds.images()), captions=ds.captions(), tokenizer=tokenizer, tok_dir=tok_dir,
                items=[(c, questions(s)) for c, s in zip(ds.captions(), ds.scenes)])


def tiny_config(tokenizer, text_input=True):
    config = toy_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), text_input)
    return replace(
        config, num_query_tokens=4, image_text_hidden_size=16,
        vision_config=replace(config.vision_config, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2),
        qformer_config=replace(config.qformer_config, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, encoder_hidden_size=32),
        text_config=replace(config.text_config, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                            num_attention_heads=2, word_embed_proj_dim=32))


def decreased(history, key="loss"):
    values = [h[key] for h in history]
    assert all(torch.isfinite(torch.tensor(values))), values
    return sum(values[-3:]) / 3 < sum(values[:3]) / 3


# ---- each stage trains -----------------------------------------------------------------------------------


def test_frozen_parts_train(world):
    config = tiny_config(world["tokenizer"])
    vit = Blip2(replace(config, text_config=None)).vision_model
    init_weights(vit)
    progress = pretrain_vision(vit, world["pixels"], cell_labels(world["ds"].scenes), steps=12, batch_size=24,
                               lr=3e-3, quiet=True)
    assert decreased(progress.history)
    assert not any(p.requires_grad for p in vit.parameters()) and not vit.training  # frozen afterwards

    opt = Blip2(config).language_model
    init_weights(opt)
    progress = pretrain_language_model(opt, world["tokenizer"], world["captions"], steps=12, batch_size=24,
                                       lr=3e-3, quiet=True)
    assert decreased(progress.history)
    assert not any(p.requires_grad for p in opt.parameters())


def test_quick_recipe_runs_end_to_end(tmp_path):
    """`python -m blip2_mini pretrain --quick`: every step of the recipe on tiny data, and what it saves loads
    as a stage-2 and a stage-1 checkpoint whose numbers eval.json records."""
    from blip2_mini.pretrain.run import QUICK, pretrain

    out = tmp_path / "toy"
    report = pretrain(QUICK, out, quiet=True)
    recorded = json.loads((out / "eval.json").read_text())
    assert recorded["recipe"] == vars(QUICK) and set(recorded["wall_seconds"]) >= {"vit", "opt", "stage1", "stage2"}
    assert recorded["frozen_checks"] == json.loads(json.dumps(report["frozen_checks"]))
    model = load_model(out, progress=False)
    assert model.config.num_query_tokens == 32 and model.qformer.embeddings is None
    assert load_model(tmp_path / "toy-itm", progress=False).qformer.embeddings is not None


def test_language_model_refuses_texts_longer_than_its_positions(world):
    """OPT's positions are learned: a training text past the table must be a clear error, not an IndexError
    deep in the embedding (the quick recipe once hit it with a 330-token vocabulary)."""
    config = tiny_config(world["tokenizer"])
    opt = Blip2(replace(config, text_config=replace(config.text_config, max_position_embeddings=12))).language_model
    with pytest.raises(ValueError, match=r"1 of the language model's training texts are longer than its 12 positions"):
        pretrain_language_model(opt, world["tokenizer"], ["a small red circle", world["captions"][0] * 3], steps=1,
                                quiet=True)


def test_paired_documents_restate_one_scene(world):
    """Each document is "description</s>restatement" about one scene: the description lists the scene's shapes
    (in caption order or shuffled), the restatement is its caption or one of its questions with the answer. The
    tokenizer reads the `</s>` in the text as the EOS id, so the LM sees two documents packed as OPT's were."""
    scenes, tokenizer = world["ds"].scenes, world["tokenizer"]
    docs = paired_documents(scenes, 60, seed=3)
    assert docs == paired_documents(scenes, 60, seed=3)  # deterministic
    kinds = {"shuffled": 0, "caption": 0, "question": 0}
    for doc in docs:
        first, second = doc.split("</s>")
        scene = next(s for s in scenes if sorted(map(str, parse_caption(first))) == sorted(map(str, s.attributes))
                     and (second == caption(s) or second in [vqa_text(q, a) for q, a in questions(s)]))
        kinds["shuffled"] += first != caption(scene)
        kinds["caption" if second == caption(scene) else "question"] += 1
        ids = tokenizer.encode(doc)
        assert ids.count(tokenizer.eos_token_id) == 2 and ids[0] == tokenizer.bos_token_id  # BOS is EOS in OPT
    assert all(n > 5 for n in kinds.values()), kinds


def test_vit_head_names_cells_and_tokens():
    """The ViT's throw-away head: kind/colour/size of the five cells from their own tokens, and for every one
    of the P tokens which token it is (the position the Q-Former's cross-attention cannot see otherwise)."""
    torch.manual_seed(0)
    head = CellHead(width=8, num_tokens=10)
    tokens = torch.randn(2, 10, 8)
    cells, where = head(tokens)
    assert CellHead.CELL_TOKENS == [2, 4, 5, 6, 8]  # top, left, center, right, bottom of the 3x3 patch grid
    torch.testing.assert_close(cells["colour"][:, 1], head.out(tokens[:, 4])[:, 5:12])  # left cell: token 4
    # "where" reads each token alone: shuffle the tokens and its answers move with them, so the only way to
    # name a token's place is from what the ViT wrote into that token.
    perm = torch.randperm(10)
    torch.testing.assert_close(head(tokens[:, perm])[1], where[:, perm])


def test_stage1_trains_all_three_losses(world):
    config = tiny_config(world["tokenizer"])
    torch.manual_seed(0)
    blip2 = Blip2(replace(config, text_config=None, image_token_index=None))
    init_weights(blip2)
    with torch.no_grad():
        image_embeds = blip2.vision_model(world["pixels"])  # frozen random ViT
    model = Stage1Model(blip2)
    progress = train_stage1(model, image_embeds, world["captions"], world["tokenizer"], steps=15, batch_size=12,
                            lr=3e-3, quiet=True)
    for key in ("loss", "itc", "itg"):
        assert decreased(progress.history, key), key
    assert all(torch.isfinite(torch.tensor(h["itm"])) for h in progress.history)


ITM_PRIOR = 0.6365  # cross-entropy of always answering P(match) = 1/3: ITM has 1 positive per 2 negatives


def test_init_weights_spreads_the_queries(world):
    """Queries left at zeros make the Q-Former's first LayerNorm divide by ~0: their gradient was ~1e13 and,
    after clipping, no other parameter moved (the first shipped model's ITM loss never left ITM_PRIOR)."""
    torch.manual_seed(0)
    blip2 = Blip2(replace(tiny_config(world["tokenizer"]), text_config=None, image_token_index=None))
    init_weights(blip2)
    assert 0.01 < blip2.query_tokens.std().item() < 0.04
    model = Stage1Model(blip2)
    texts = world["captions"][:8]
    ids, mask = qformer_text(world["tokenizer"], texts)
    with torch.no_grad():
        image_embeds = blip2.vision_model(world["pixels"][:8])
    loss, _ = model(image_embeds, ids, mask, texts, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grad_norm = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    assert grad_norm < 100, grad_norm


def test_itm_learns_to_match(world):
    """On 8 pairs whose images are trivially told apart, the ITM branch (hard negatives drawn from ITC, labels
    [1]*B + [0]*2B, bidirectional pass, head on the averaged queries) must learn well below its class prior.
    It sits on the prior for ~150 steps before the queries start to compare image and text: hence 500."""
    torch.manual_seed(0)
    blip2 = Blip2(replace(tiny_config(world["tokenizer"]), text_config=None, image_token_index=None))
    init_weights(blip2)
    model = Stage1Model(blip2).train()
    B, P, Dv = 8, 10, blip2.config.vision_config.hidden_size
    image_embeds = torch.randn(B, 1, Dv).expand(B, P, Dv)  # image i: one random vector on every token
    texts = world["captions"][:B]
    ids, mask = qformer_text(world["tokenizer"], texts)
    same = torch.tensor([[a == b for b in texts] for a in texts])
    assert not (same & ~torch.eye(B, dtype=torch.bool)).any()  # 8 different captions: 8 x 7 negatives
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(500):
        with torch.no_grad():
            image_feats, text_feats = model.itc_features(image_embeds, ids, mask)
            sim_i2t = model.similarity(image_feats, text_feats) / model.temperature
        loss = model.itm_loss(image_embeds, ids, mask, sim_i2t, same, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train_stage1 does
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - 0.693) < 0.05  # an untrained head: 50/50 on everything
    assert sum(losses[-100:]) / 100 < 0.8 * ITM_PRIOR, losses[-100::10]


def test_itm_negatives_are_half_hard_however_sure_itc_is():
    """negative_weights: half softmax(similarity) over the wrong partners only, half uniform over them. A sure
    ITC (the right caption at +20) must not shrink the hard half: masked after the softmax, it would vanish."""
    sim = torch.tensor([[20.0, 2.0, 0.0], [0.0, 20.0, 0.0], [1.0, 1.0, 20.0]])
    same = torch.eye(3, dtype=torch.bool)
    weights = negative_weights(sim, same)
    hard = torch.tensor([2.0, 0.0]).softmax(0)  # row 0's wrong captions: 0.881, 0.119
    torch.testing.assert_close(weights[0], torch.tensor([0.0, *(0.5 * hard + 0.25)]))
    torch.testing.assert_close(weights[1], torch.tensor([0.5, 0.0, 0.5]))
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    same[0] = True  # duplicates of a caption are never its negatives; a row with only duplicates has none
    with pytest.raises(ValueError, match="no negatives for ITM"):
        negative_weights(sim, same)


def test_weight_decay_spares_norms_biases_and_frozen_parameters(world, monkeypatch):
    """As in the BLIP-2 code: AdamW's decay on matrices (and the queries) only; gains and biases are not pulled
    towards 0; frozen parameters are not handed to the optimizer at all."""
    from blip2_mini.pretrain import stage1, stage2

    built = []

    def spy(named_params, lr, weight_decay):
        built.append(adamw(named_params, lr, weight_decay))
        return built[-1]

    monkeypatch.setattr(stage1, "adamw", spy)
    monkeypatch.setattr(stage2, "adamw", spy)
    blip2 = Blip2(replace(tiny_config(world["tokenizer"]), text_config=None, image_token_index=None))
    train_stage1(Stage1Model(blip2), torch.zeros(1, 10, 32), ["a"], world["tokenizer"], steps=0, quiet=True)
    model = Blip2(tiny_config(world["tokenizer"], text_input=False))
    train_stage2(model, torch.zeros(1, 10, 32), world["items"], world["tokenizer"], steps=0, quiet=True)
    for optimizer in built:
        decayed, spared = (group["params"] for group in optimizer.param_groups)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
        assert decayed and all(p.ndim >= 2 for p in decayed) and spared and all(p.ndim < 2 for p in spared)
        assert all(p.requires_grad for p in decayed + spared)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, spared = (group["params"] for group in built[1].param_groups)
    assert "query_tokens" in {names[id(p)] for p in decayed}
    assert not any(names[id(p)].startswith(("language_model.", "vision_model.")) for p in decayed + spared)


def test_stage2_trains_through_frozen_lm(world):
    config = tiny_config(world["tokenizer"], text_input=False)
    torch.manual_seed(0)
    model = Blip2(config)
    init_weights(model)
    init_weights(model.language_model, std=0.2)  # an untrained LM with std 0.02 passes almost no gradient
    lm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    with torch.no_grad():
        image_embeds = model.vision_model(world["pixels"])
    progress = train_stage2(model, image_embeds, world["items"], world["tokenizer"], steps=15, batch_size=12,
                            lr=3e-3, quiet=True)
    assert decreased(progress.history)
    for k, v in model.language_model.state_dict().items():  # the LM is frozen: not one number moved
        assert torch.equal(v, lm_before[k]), k


# ---- the three masks of stage 1 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_model(world):
    config = tiny_config(world["tokenizer"])
    torch.manual_seed(1)
    blip2 = Blip2(replace(config, text_config=None, image_token_index=None))
    init_weights(blip2, std=0.2)  # large weights: every dependency shows up in the outputs
    ids, mask = qformer_text(world["tokenizer"], world["captions"][:3])
    with torch.no_grad():
        image_embeds = blip2.vision_model(world["pixels"][:3])
    return Stage1Model(blip2).eval(), image_embeds, ids, mask, world["pixels"][:3]


@torch.no_grad()
def test_padding_ids_change_nothing_under_any_mask(stage1_model):
    """What sits in a padded slot is invisible: other ids there leave every real position (queries and text) of
    all three passes, and the ITG loss, exactly as they were."""
    model, image_embeds, ids, mask, _ = stage1_model
    assert (mask == 0).any()  # three captions of different lengths
    other = ids.masked_fill(mask == 0, 7)
    real = torch.cat([torch.ones(len(ids), model.blip2.config.num_query_tokens, dtype=torch.long), mask], 1).bool()
    for kind in ("unimodal", "bidirectional", "multimodal_causal"):
        a, b = model.run_qformer(image_embeds, ids, mask, kind), model.run_qformer(image_embeds, other, mask, kind)
        assert torch.equal(a[real], b[real]), kind
    assert torch.equal(model.itg_loss(image_embeds, ids, mask), model.itg_loss(image_embeds, other, mask))


def test_stage2_scores_the_answer_and_eos_only(world):
    """Stage-2 labels: the image slots, BOS and a question are context (-100); the caption or the answer, and
    one EOS, are scored."""
    from blip2_mini.pretrain.stage2 import stage2_example

    tok, Q, image_id = world["tokenizer"], 3, len(world["tokenizer"]) - 1
    ids, labels = stage2_example(tok, Q, image_id, "", "a red circle")
    caption = tok.encode("a red circle", add_special_tokens=False) + [tok.eos_token_id]  # right after BOS
    assert ids == [image_id] * Q + [tok.bos_token_id] + caption and labels == [-100] * (Q + 1) + caption
    prompt = "Question: what colour is it? Answer:"
    ids, labels = stage2_example(tok, Q, image_id, prompt, "red")
    answer = tok.encode(" red", add_special_tokens=False) + [tok.eos_token_id]
    context = [image_id] * Q + tok.encode(prompt)
    assert ids == context + answer and labels == [-100] * len(context) + answer


@torch.no_grad()
def test_itc_text_cannot_see_queries(stage1_model):
    model, image_embeds, ids, mask, pixels = stage1_model
    _, text = model.itc_features(image_embeds, ids, mask)
    _, text_other_image = model.itc_features(image_embeds.flip(0) * 3, ids, mask)
    torch.testing.assert_close(text, text_other_image)  # unimodal: the image cannot leak into the text side
    # ... and the text [CLS] is the retrieval model's own text embedding (model.text_embeds, text alone).
    torch.testing.assert_close(text, model.blip2.text_embeds(ids, mask)[:, 0], atol=1e-5, rtol=1e-5)
    images, _ = model.itc_features(image_embeds, ids.flip(0), mask.flip(0))
    torch.testing.assert_close(images, model.itc_features(image_embeds, ids, mask)[0])  # nor text into queries


@torch.no_grad()
def test_itm_fuses_both_ways(stage1_model):
    model, image_embeds, ids, mask, pixels = stage1_model
    Q = model.blip2.config.num_query_tokens
    h = model.run_qformer(image_embeds, ids, mask, "bidirectional")
    h_other = model.run_qformer(image_embeds.flip(0) * 3, ids, mask, "bidirectional")
    assert (h[:, Q:] - h_other[:, Q:]).abs().max() > 1e-3  # text sees the queries (hence the image)
    h_text = model.run_qformer(image_embeds, ids.flip(0), mask.flip(0), "bidirectional")
    assert (h[:, :Q] - h_text[:, :Q]).abs().max() > 1e-3  # queries see the text
    # What stage 1 trains is what the retrieval model computes at inference (model.itm, model.itc).
    torch.testing.assert_close(model.itm_logits(image_embeds, ids, mask), model.blip2.itm(pixels, ids, mask))
    images, text = model.itc_features(image_embeds, ids, mask)
    torch.testing.assert_close(model.similarity(images, text), model.blip2.itc(pixels, ids, mask), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_itg_is_causal_and_queries_do_not_see_text(stage1_model):
    model, image_embeds, ids, mask, pixels = stage1_model
    Q = model.blip2.config.num_query_tokens
    changed = ids.clone()
    changed[:, 6:] = 5  # rewrite the text from token 6 on
    h = model.run_qformer(image_embeds, ids, mask, "multimodal_causal")
    h2 = model.run_qformer(image_embeds, changed, mask, "multimodal_causal")
    torch.testing.assert_close(h[:, : Q + 6], h2[:, : Q + 6])  # queries and the first 6 tokens: unchanged
    assert (h[:, Q + 6:] - h2[:, Q + 6:]).abs().max() > 1e-3
    h3 = model.run_qformer(image_embeds.flip(0) * 3, ids, mask, "multimodal_causal")
    assert (h[:, Q:] - h3[:, Q:]).abs().max() > 1e-3  # the text does see the image, through the queries


# ---- export is the loader's inverse ----------------------------------------------------------------------


def test_export_round_trip(world, tmp_path):
    tokenizer = world["tokenizer"]
    torch.manual_seed(0)
    model = Blip2(tiny_config(tokenizer))  # with the stage-1 text side: the export must drop it
    init_weights(model, std=0.2)
    save_generation_model(model, world["tok_dir"], tmp_path / "gen")
    loaded = load_model(tmp_path / "gen", progress=False)
    assert loaded.qformer.embeddings is None
    ours = dict(model.named_parameters())
    for name, tensor in loaded.named_parameters():
        torch.testing.assert_close(tensor, ours[name], rtol=0, atol=0, msg=name)
    pixels = world["pixels"][:2]
    assert torch.equal(loaded.generate(pixels, max_new_tokens=6), model.eval().generate(pixels, max_new_tokens=6))
    assert len(load_tokenizer(tmp_path / "gen")) == len(tokenizer)

    retrieval = Blip2(replace(tiny_config(tokenizer), text_config=None, image_token_index=None))
    init_weights(retrieval, std=0.2)
    save_retrieval_model(retrieval, world["tok_dir"], tmp_path / "itm")
    loaded = load_model(tmp_path / "itm", progress=False)
    for name, tensor in loaded.named_parameters():
        torch.testing.assert_close(tensor, dict(retrieval.named_parameters())[name], rtol=0, atol=0, msg=name)
    # The retrieval tokenizer frames text as stage 1 did: "<s> text </s>".
    ids, _ = qformer_text(tokenizer, ["a small red circle on the left"])
    assert load_tokenizer(tmp_path / "itm").encode("a small red circle on the left") == ids[0].tolist()


def test_export_names_are_official(world):
    model = Blip2(tiny_config(world["tokenizer"]))
    names = set(official_state_dict(model))
    assert "vision_model.encoder.layers.0.self_attn.qkv.bias" in names  # fused [q, 0, v]
    assert "language_model.lm_head.weight" in names  # tied head written out, as published files do
    assert ours_to_official("qformer.layers.1.ffn_query.fc1.weight") == "qformer.encoder.layer.1.intermediate_query.dense.weight"
    with pytest.raises(KeyError, match="no KEY_MAP entry"):
        ours_to_official("not.a.parameter")


# ---- the shipped model -----------------------------------------------------------------------------------


shipped = pytest.mark.skipif(not (SHIPPED / "eval.json").exists(), reason="no shipped model in weights/")


@shipped
def test_shipped_evaluation_reproduces():
    """The numbers eval.json records for a small check subset come out again (CPU kernels may differ in the
    last bits between machines, which can flip a rare near-tie: hence a small tolerance)."""
    recorded = json.loads((SHIPPED / "eval.json").read_text())["check"]
    model = load_model(SHIPPED, progress=False)
    metrics, _ = evaluate_generation(model, load_tokenizer(SHIPPED), recorded["n_images"], max_questions=3)
    for key in ("caption_exact_match", "caption_colour_acc", "caption_kind_acc", "vqa_accuracy"):
        assert metrics[key] == pytest.approx(recorded[key], abs=0.05), key
    itm_dir = SHIPPED.with_name(SHIPPED.name + "-itm")
    if itm_dir.exists():
        r = evaluate_retrieval(load_model(itm_dir, progress=False), load_tokenizer(itm_dir), 100, rerank=4)
        assert r["retrieval_r1_itc_i2t"] == pytest.approx(recorded["retrieval_r1_itc_i2t"], abs=0.05)


@shipped
def test_shipped_frozen_checks_reproduce():
    """eval.json's checks of the frozen parts (the ViT says where each token is; the OPT restates a caption it
    was given, and answers questions about it) come out again from the saved weights."""
    recorded = json.loads((SHIPPED / "eval.json").read_text())["frozen_checks"]
    model = load_model(SHIPPED, progress=False)
    tokenizer = load_tokenizer(SHIPPED)
    val = ShapesDataset("val", n=200, seed=0, image_size=72)
    for key, shuffled in (("lm_restates_caption", False), ("lm_restates_shuffled", True)):
        measured = lm_restating_accuracy(model.language_model, tokenizer, val.scenes, shuffled=shuffled)
        for attribute, value in recorded[key].items():
            assert measured[attribute] == pytest.approx(value, abs=0.02), (key, attribute)
    measured = lm_answering_accuracy(model.language_model, tokenizer, val.scenes)
    for kind, value in recorded["lm_answers_from_caption"].items():
        assert measured[kind] == pytest.approx(value, abs=0.02), ("lm_answers_from_caption", kind)
    train = ShapesDataset("train", n=1000, seed=0, image_size=72)
    probe = token_position_probe(model.vision_model, pixel_values(train.images()), pixel_values(val.images()))
    assert probe == pytest.approx(recorded["vit_token_position_probe"], abs=0.02)


@shipped
def test_shipped_config_is_official_opt_layout():
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "opt" and not config["qformer_config"]["use_qformer_text_input"]
    tokenizer = load_tokenizer(SHIPPED)
    assert tokenizer.convert_tokens_to_ids("<image>") == config["image_token_index"]
    assert json.loads((SHIPPED / "processor_config.json").read_text())["num_query_tokens"] == config["num_query_tokens"]
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 20e6


@shipped
def test_evaluate_command_exits_zero(capsys):
    """`python -m blip2_mini evaluate` prints its table and exits 0; its main() returns the metrics to Python
    callers, and that dict must not become the process's exit status (sys.exit(dict) prints it and exits 1)."""
    from blip2_mini import __main__ as cli

    assert cli.main(["evaluate", "--n-images", "2", "--n-retrieval", "100", "--threads", "1"]) == 0
    assert "retrieval_r1_itc_i2t" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads: must be at least 1"),
    (["--n-retrieval", "50"], "--n-retrieval 50: retrieval needs at least one gallery of 100 images"),
    (["--json", "/nonexistent/x.json"], "the folder /nonexistent does not exist"),
    (["--retrieval-weights", "/nonexistent"], "/nonexistent: no such directory"),
    (["--retrieval-weights", str(SHIPPED)], "a captioning checkpoint; --retrieval-weights needs a stage-1"),
])
def test_evaluate_refuses_bad_arguments_before_evaluating(capsys, monkeypatch, args, message):
    from blip2_mini import __main__ as cli

    monkeypatch.setattr(evaluate_module, "evaluate_generation", lambda *a, **k: pytest.fail("evaluated first"))
    try:
        status = cli.main(["evaluate", *args])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_command_reports_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        evaluate_module.main(["--weights", str(tmp_path / "nothing")])


@shipped
@pytest.mark.live
def test_shipped_model_generates_like_transformers():
    """transformers' Blip2ForConditionalGeneration + Blip2Processor read the shipped directory and produce the
    same greedy tokens as blip2_mini, for captions and for a VQA prompt."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    hf, info = Blip2ForConditionalGeneration.from_pretrained(SHIPPED, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    processor = Blip2Processor.from_pretrained(SHIPPED)
    ours = load_model(SHIPPED, progress=False)
    tokenizer = load_tokenizer(SHIPPED)
    ds = ShapesDataset("test", n=4, seed=0, image_size=72)
    images = [ds[i]["image"] for i in range(4)]

    inputs = processor(images=images, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], pixel_values(ds.images()), atol=1e-5, rtol=0)
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=30, do_sample=False, num_beams=1)
    mine = ours.generate(inputs["pixel_values"], max_new_tokens=30)
    # With no text the reference makes up the prompt `<image>` x Q + BOS itself, and returns it before the new tokens.
    prompt = [ours.config.image_token_index] * ours.config.num_query_tokens + [tokenizer.bos_token_id]
    assert theirs[:, : len(prompt)].tolist() == [prompt] * 4
    theirs = theirs[:, len(prompt):]
    assert theirs.tolist() == mine[:, : theirs.shape[1]].tolist()
    assert "circle" in " ".join(tokenizer.batch_decode(mine)) or "square" in " ".join(tokenizer.batch_decode(mine))

    prompt = "Question: what colour is the circle? Answer:"
    inputs = processor(images=images[:1], text=prompt, return_tensors="pt")
    expected = [ours.config.image_token_index] * ours.config.num_query_tokens + tokenizer.encode(prompt)
    assert inputs["input_ids"][0].tolist() == expected
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=1)
    mine = ours.generate(inputs["pixel_values"], input_ids=inputs["input_ids"], max_new_tokens=5)
    new = theirs[:, inputs["input_ids"].shape[1]:]
    assert new.tolist() == mine[:, : new.shape[1]].tolist()
