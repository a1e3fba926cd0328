"""Fast checks of the walkthrough notebooks, without running them (CI executes them with tools/run_notebooks.py).

They guard what a reader relies on: every notebook is valid, was committed *with* its outputs and without
errors, stays small, names its checkpoint in one variable in the first code cell, imports blip2_mini instead of
redefining model code, and compares a stage with the reference numbers in a visible cell.
"""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
WALKTHROUGH = ["01_image_to_patches", "02_vision_transformer", "03_qformer", "04_projection_and_language_model",
               "05_decoding", "06_end_to_end", "07_pretraining", "08_int8_quantization"]


def code_cells(path):
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def test_every_walkthrough_notebook_is_there():
    assert set(WALKTHROUGH) <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_valid_and_small(path):
    nbformat.validate(nbformat.read(path, as_version=4))
    assert path.stat().st_size < 1_000_000, f"{path.name}: {path.stat().st_size / 1e6:.1f} MB; keep outputs small"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_and_no_errors(path):
    cells = code_cells(path)
    unexecuted = [i for i, cell in enumerate(cells) if cell.execution_count is None]
    assert not unexecuted, f"{path.name}: code cells {unexecuted} have no output; run tools/run_notebooks.py --write"
    errors = [i for i, cell in enumerate(cells) for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: code cells {errors} were saved with an error"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_imports_the_package_and_names_the_checkpoint(path):
    first = code_cells(path)[0].source
    assert "import blip2_mini" in first
    assert re.search(r"^WEIGHTS = ", first, re.M), f"{path.name}: the checkpoint path must be set in the first cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_model_code_redefined(path):
    for cell in code_cells(path):
        assert not re.search(r"class \w+\((torch\.)?nn\.Module\)", cell.source), f"{path.name}: defines a module"
        assert not re.search(r"def forward\(", cell.source), f"{path.name}: defines a forward()"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem in WALKTHROUGH], ids=lambda p: p.stem)
def test_compares_with_the_reference(path):
    sources = [cell.source for cell in code_cells(path)]
    assert any("reference.safetensors" in s and "max" in s for s in sources), \
        f"{path.name}: no cell compares a stage with the stored reference numbers"
