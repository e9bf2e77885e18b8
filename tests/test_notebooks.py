"""The shipped notebooks run top to bottom and say what they claim (slow: ~3 min on 2 cores)."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_code_cells(path):
    nb = json.loads(path.read_text())
    namespace = {"__name__": "__notebook__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            code = compile("".join(cell["source"]), f"{path.name}[cell {i}]", "exec")
            exec(code, namespace)  # noqa: S102 - our own notebook
    return namespace


@pytest.mark.slow
def test_quickstart_notebook(smollm2_path):
    ns = run_code_cells(NOTEBOOKS / "quickstart.ipynb")
    ppl = {r["name"]: r["perplexity"] for r in ns["results"]}
    assert ppl["reference"] < ppl["3-bit + DecDEC k_chunk 8"] < ppl["3-bit"]
    assert isinstance(ns["text"], str) and ns["text"].strip()
