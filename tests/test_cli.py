"""The whole pipeline as a user runs it: blip2_mini.load (model + processor from one official-layout directory),
processor -> generate -> decode, and `python -m blip2_mini`, against what the reference pipeline produced for the
bundled example images (tests/fixtures/pipeline, built by tests/reference/build_pipeline_fixtures.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import blip2_mini
from blip2_mini import __main__ as cli
from blip2_mini.processing import load_image

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "tests" / "fixtures" / "pipeline"
EXAMPLES = ROOT / "examples"


def reference(name):
    return json.loads((PIPELINES / name / "reference.json").read_text())


def run(capsys, *args):
    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("name", ["opt-pipeline", "t5-pipeline"])
@pytest.mark.parametrize("mode", ["caption", "prompt"])
def test_python_pipeline_matches_reference(name, mode):
    expected = reference(name)
    model, processor = blip2_mini.load(PIPELINES / name, progress=False)
    images = [load_image(EXAMPLES / n) for n in expected["images"]]  # as the reference's load_image: plain RGB
    text = None if mode == "caption" else [expected["prompt"]] * len(images)
    inputs = processor(images=images, text=text, return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=8)
    assert ids.tolist() == expected["outputs"][mode]["token_ids"]
    assert processor.batch_decode(ids) == [t.strip() for t in expected["outputs"][mode]["text"]]


@pytest.mark.parametrize("name", ["opt-pipeline", "t5-pipeline"])
def test_caption_command_json_matches_reference(capsys, name):
    expected = reference(name)
    images = [EXAMPLES / n for n in expected["images"]]
    status, out, err = run(capsys, "caption", *images, "--weights", PIPELINES / name, "--max-new-tokens", 8, "--json")
    assert status == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["image"]).name for r in rows] == expected["images"]
    assert [r["token_ids"] for r in rows] == expected["outputs"]["caption"]["token_ids"]
    assert [r["text"] for r in rows] == [t.strip() for t in expected["outputs"]["caption"]["text"]]
    assert "captioning [" in err  # progress on stderr, never on stdout


@pytest.mark.parametrize("name", ["opt-pipeline", "t5-pipeline"])
def test_vqa_command_builds_the_papers_prompt(capsys, name):
    expected = reference(name)
    image = EXAMPLES / expected["images"][0]
    status, out, err = run(capsys, "vqa", image, "what is the colour of the circle?", "--weights", PIPELINES / name,
                           "--max-new-tokens", 8, "--json")
    assert status == 0, err
    row = json.loads(out)
    assert row["prompt"] == expected["prompt"]
    assert row["token_ids"] == expected["outputs"]["prompt"]["token_ids"][0]


def test_folder_with_an_unreadable_image_reports_it_and_captions_the_rest(capsys, tmp_path):
    for n in reference("opt-pipeline")["images"]:
        shutil.copy(EXAMPLES / n, tmp_path / n)
    (tmp_path / "broken.png").write_text("not an image")
    status, out, err = run(capsys, "caption", tmp_path, "--weights", PIPELINES / "opt-pipeline", "--max-new-tokens", 3)
    assert status == 1
    assert len(out.splitlines()) == 3 and "broken.png" not in out
    broken = tmp_path / "broken.png"
    assert f"error: {broken}: not an image file (Pillow cannot identify its format)\n" in err  # the path once


@pytest.mark.parametrize("args, message", [
    (["--num-beams", "0"], "--num-beams: must be at least 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens: must be at least 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--min-new-tokens", "9", "--max-new-tokens", "4"], "exceeds --max-new-tokens"),
    (["--sample", "--num-beams", "3"], "cannot be combined"),
    (["--dtype", "float64"], "invalid choice"),
    (["--quantize", "int4"], "invalid choice"),
    (["--quantize", "int8", "--device", "meta"], "--device meta: not a device to compute on"),
    (["--temperature", "0.7"], "--temperature only applies with --sample"),
    (["--top-k", "5", "--top-p", "0.5"], "--top-k, --top-p only apply with --sample"),
    (["--length-penalty", "2"], "--length-penalty only applies with --num-beams > 1"),
    (["--sample", "--temperature", "inf"], "--temperature: must be positive and finite"),
    (["--num-beams", "3", "--length-penalty", "nan"], "--length-penalty: must be a finite number"),
    (["--sample", "--seed", "99999999999999999999999"], "--seed: must be in [0, 2**63)"),
    (["--min-new-tokens", "100", "--max-new-tokens", "100"], "positions; the language model has 64; lower max_new"),
])
def test_impossible_options_exit_2_with_one_line(capsys, args, message):
    try:
        status, out, err = run(capsys, "caption", EXAMPLES / "shapes.png", "--weights", PIPELINES / "opt-pipeline", *args)
    except SystemExit as e:  # argparse's own errors
        status, err = e.code, capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1, err  # argparse's errors too: no usage block
    assert "Traceback" not in err


def test_weights_that_do_not_exist_or_are_not_a_checkpoint(capsys, tmp_path):
    status, _, err = run(capsys, "caption", EXAMPLES / "shapes.png", "--weights", tmp_path / "nope")
    assert status == 2 and "no such directory" in err and len(err.strip().splitlines()) == 1
    status, _, err = run(capsys, "caption", EXAMPLES / "shapes.png", "--weights", tmp_path)
    assert status == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1


def test_no_weights_and_no_shipped_model(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "DEFAULT_WEIGHTS", tmp_path / "missing")
    status, _, err = run(capsys, "caption", EXAMPLES / "shapes.png")
    assert status == 2 and "weights/README.md" in err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["caption", "--help"])
    text = capsys.readouterr().out
    for option in ("--weights", "--prompt", "--num-beams", "--max-new-tokens", "--min-new-tokens", "--length-penalty",
                   "--repetition-penalty", "--sample", "--temperature", "--top-k", "--top-p", "--seed", "--dtype",
                   "--device", "--quantize", "--prepack", "--batch-size", "--json"):
        assert option in text, option


def test_shipped_model_is_the_default(capsys):
    if not (cli.DEFAULT_WEIGHTS / "config.json").exists():
        pytest.skip("no shipped model in weights/")
    status, out, err = run(capsys, "caption", EXAMPLES / "shapes.png", "--max-new-tokens", 12)
    assert status == 0, err
    assert out.startswith(str(EXAMPLES / "shapes.png") + ": ") and len(out.split(": ", 1)[1].strip()) > 0


@pytest.mark.parametrize("mode, activations", [("int8", "float"), ("int8-dynamic", "int8")])
def test_caption_quantize_option_gives_the_quantized_models_tokens(capsys, mode, activations):
    from blip2_mini.quantize import quantize_language_model
    status, out, _ = run(capsys, "caption", EXAMPLES / "shapes.png", "--weights", PIPELINES / "opt-pipeline",
                         "--quantize", mode, "--json", "--max-new-tokens", "12")
    assert status == 0
    model, processor = blip2_mini.load(PIPELINES / "opt-pipeline", progress=False)
    quantize_language_model(model, activations)
    inputs = processor(images=load_image(EXAMPLES / "shapes.png"))
    expected = model.generate(**inputs, max_new_tokens=12)[0].tolist()
    assert json.loads(out)["token_ids"] == expected


def test_caption_prepack_option_packs_and_gives_the_same_tokens(capsys, monkeypatch):
    from blip2_mini.cpu import PackedLinear

    loaded, load = [], cli.load_checkpoint

    def keep_what_was_loaded(args):
        loaded.append(load(args))
        return loaded[-1]

    monkeypatch.setattr(cli, "load_checkpoint", keep_what_was_loaded)
    args = ["caption", EXAMPLES / "shapes.png", "--weights", PIPELINES / "opt-pipeline", "--json",
            "--max-new-tokens", "12", "--num-beams", "2"]
    status, out, err = run(capsys, *args, "--prepack")
    assert status == 0, err
    assert any(isinstance(m, PackedLinear) for m in loaded[-1][0].modules())
    status, plain, _ = run(capsys, *args)
    assert status == 0 and not any(isinstance(m, PackedLinear) for m in loaded[-1][0].modules())
    assert json.loads(out)["token_ids"] == json.loads(plain)["token_ids"]


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_dtype_auto_loads_the_policy_that_fits_the_cpu(capsys, monkeypatch, fast_bf16):
    """--dtype auto: on a CPU that multiplies bf16 natively, the ViT and the language model in bf16 and the
    Q-Former in fp32 (the tokens are those of a model loaded with that policy); on any other CPU, fp32."""
    from blip2_mini import loader
    monkeypatch.setattr(loader, "cpu_multiplies_bf16_faster", lambda: fast_bf16)
    dtype, policy = loader.auto_dtype("cpu")
    assert dtype is torch.float32
    assert policy == ({"vision_model": torch.bfloat16, "language_model": torch.bfloat16} if fast_bf16 else None)
    status, out, err = run(capsys, "caption", EXAMPLES / "shapes.png", "--weights", PIPELINES / "opt-pipeline",
                           "--dtype", "auto", "--json", "--max-new-tokens", "12")
    assert status == 0, err
    model, processor = blip2_mini.load(PIPELINES / "opt-pipeline", dtype_policy=policy, progress=False)
    assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
    inputs = processor(images=load_image(EXAMPLES / "shapes.png"))
    assert json.loads(out)["token_ids"] == model.generate(**inputs, max_new_tokens=12)[0].tolist()


def test_a_too_large_image_is_skipped_and_the_rest_captioned(capsys, tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    shutil.copy(EXAMPLES / "shapes.png", tmp_path / "shapes.png")  # 224 x 224
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30000)  # refused above 60000 pixels: big.png, not shapes.png
    status, out, err = run(capsys, "caption", tmp_path, "--weights", PIPELINES / "opt-pipeline", "--max-new-tokens", 3)
    assert status == 1 and out.startswith(str(tmp_path / "shapes.png") + ": ")
    assert f"error: {tmp_path / 'big.png'}: too large to read safely" in err and "Traceback" not in err


def test_folder_walk_skips_subfolders_named_like_images(capsys, tmp_path):
    shutil.copy(EXAMPLES / "shapes.png", tmp_path / "shapes.png")
    (tmp_path / "old.png").mkdir()
    status, out, err = run(capsys, "caption", tmp_path, "--weights", PIPELINES / "opt-pipeline", "--max-new-tokens", 3)
    assert status == 0 and len(out.splitlines()) == 1 and "old.png" not in out + err


@pytest.mark.parametrize("command", [["vqa", "q?"], ["match", "a text"], ["stages"]])
def test_a_missing_image_is_reported_before_the_model_is_loaded(capsys, monkeypatch, tmp_path, command):
    def no_loading(args):
        raise AssertionError("the model was loaded for an image that does not exist")

    monkeypatch.setattr(cli, "load_checkpoint", no_loading)
    status, _, err = run(capsys, command[0], tmp_path / "nope.png", *command[1:])
    assert status == 1 and f"error: {tmp_path / 'nope.png'}: no such file" in err


def test_only_missing_images_load_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "load_checkpoint", lambda args: pytest.fail("loaded a model for no images"))
    status, out, err = run(capsys, "caption", tmp_path / "a.png", tmp_path / "b.png")
    assert status == 1 and out == "" and err.count("no such file or directory") == 2


def test_match_and_rank_default_to_the_shipped_retrieval_model(capsys):
    if not (cli.DEFAULT_RETRIEVAL_WEIGHTS / "config.json").exists():
        pytest.skip("no shipped retrieval model in weights/")
    status, out, err = run(capsys, "match", EXAMPLES / "shapes.png", "a small red square on the left")
    assert status == 0 and out.startswith("ITM "), err
    status, out, err = run(capsys, "rank", EXAMPLES, "a small red square on the left", "--top-k", 2)
    assert status == 0 and out.startswith(" 1. ITM "), err
    assert "reading images [" in err  # progress while the folder is read, not only while it is embedded


def test_a_captioning_checkpoint_for_match_names_the_shipped_retrieval_model(capsys):
    status, _, err = run(capsys, "match", EXAMPLES / "shapes.png", "a text", "--weights", PIPELINES / "opt-pipeline")
    assert status == 2 and "blip2-shapes-tiny-itm" in err


def test_progress_bar_is_wiped_before_results_on_a_terminal(capsys, monkeypatch, tmp_path):
    for n in ("shapes.png", "grey.png"):
        shutil.copy(EXAMPLES / n, tmp_path / n)
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True)
    status, _, err = run(capsys, "caption", tmp_path, "--weights", PIPELINES / "opt-pipeline", "--max-new-tokens", 3,
                         "--batch-size", 1)
    assert status == 0
    assert "1/2\r\033[K" in err  # the bar of the first batch is erased before the second batch's lines


def _run_module(*args, **env):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "blip2_mini", *map(str, args)], capture_output=True, cwd=ROOT,
                          env={**os.environ, **env})


def test_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    for i in range(3):
        shutil.copy(EXAMPLES / "shapes.png", tmp_path / f"{i}.png")
    command = [sys.executable, "-m", "blip2_mini", "caption", str(tmp_path), "--batch-size", "1",
               "--weights", str(PIPELINES / "opt-pipeline"), "--max-new-tokens", "3"]
    shell = " ".join(map(str, command)) + " | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, cwd=ROOT, text=True)
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_file_names_that_are_not_utf8_are_printed_and_the_folder_goes_on(tmp_path):
    import os

    folder = os.fsencode(tmp_path)
    for name in (b"a.png", b"b\xffname.png", b"z.png"):
        shutil.copy(EXAMPLES / "shapes.png", os.fsdecode(folder + b"/" + name))
    done = _run_module("caption", tmp_path, "--weights", PIPELINES / "opt-pipeline", "--max-new-tokens", 3,
                       "--batch-size", 1, PYTHONIOENCODING="utf-8:strict")
    assert done.returncode == 0, done.stderr
    assert folder + b"/b\xffname.png: " in done.stdout and done.stdout.count(b"\n") == 3


def test_generate_refuses_more_tokens_than_the_position_table_holds():
    # OPT's positions are learned, one row per position: a prompt of T0 tokens feeds T0 + new - 1 of them.
    model, processor = blip2_mini.load(PIPELINES / "opt-pipeline", progress=False)
    inputs = processor(images=load_image(EXAMPLES / "shapes.png"), return_tensors="pt")
    prompt = model.config.num_query_tokens + 1  # captioning: the queries, then BOS
    fits = model.config.text_config.max_position_embeddings - prompt + 1
    ids = model.generate(**inputs, max_new_tokens=fits, min_new_tokens=fits)  # exactly full
    assert ids.shape[1] == fits
    with pytest.raises(ValueError, match=f"{fits + 1} new tokens need .* positions; the language model has 64"):
        model.generate(**inputs, max_new_tokens=fits + 1)


def _copy_shipped(tmp_path):
    if not (cli.DEFAULT_WEIGHTS / "config.json").exists():
        pytest.skip("no shipped model in weights/")
    return Path(shutil.copytree(cli.DEFAULT_WEIGHTS, tmp_path / "model"))


def test_a_tokenizer_of_another_model_is_refused_at_load(tmp_path):
    directory = _copy_shipped(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink()
    for f in (ROOT / "tests" / "fixtures" / "tokenizers" / "opt").iterdir():  # 800 tokens, not the toy's 396
        shutil.copy(f, directory / f.name)
    with pytest.raises(blip2_mini.loader.CheckpointError, match="the tokenizer has 801 tokens but the language "
                                                                "model's embedding has 396 rows"):
        blip2_mini.load(directory, progress=False)


def test_processor_and_model_must_agree_on_the_image_slots(tmp_path):
    directory = _copy_shipped(tmp_path)
    config = json.loads((directory / "processor_config.json").read_text())
    config["num_query_tokens"] = 16
    (directory / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(blip2_mini.loader.CheckpointError,
                       match="processor_config.json says 16 image slots, config.json 32 queries"):
        blip2_mini.load(directory, progress=False)


def test_json_output_has_a_record_for_every_image_including_failures(capsys, tmp_path):
    for n in reference("opt-pipeline")["images"]:
        shutil.copy(EXAMPLES / n, tmp_path / n)
    (tmp_path / "broken.png").write_text("not an image")
    status, out, err = run(capsys, "caption", tmp_path, tmp_path / "missing.png", "--weights", PIPELINES / "opt-pipeline",
                           "--max-new-tokens", 3, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert status == 1 and len(rows) == 5  # 3 captions, the broken file, the missing path
    failed = {Path(r["image"]).name: r["error"] for r in rows if "error" in r}
    assert failed == {"missing.png": "no such file or directory",
                      "broken.png": "not an image file (Pillow cannot identify its format)"}
    assert all("text" in r and "token_ids" in r for r in rows if "error" not in r)
    assert "error: " in err  # and still on stderr
