"""The capacity-curves notebook executes top to bottom on a tiny run."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "capacity_curves.ipynb"


def test_notebook_executes_on_a_tiny_run(evaluated_run, monkeypatch):
    _, run_dir = evaluated_run
    monkeypatch.setenv("JAXLORA_RUN_DIR", str(run_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert "4 adapters, 2 configurations" in "".join(o.get("text", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
    tables = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert "T_max" in tables[0]["data"]["text/markdown"]


MEMORY_NOTEBOOK = NOTEBOOK.parent / "memory.ipynb"


def test_memory_notebook_executes_on_a_memory_run(memory_run, monkeypatch):
    monkeypatch.setenv("JAXLORA_RUN_DIR", str(memory_run))
    nb = nbformat.read(MEMORY_NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(MEMORY_NOTEBOOK.parent)}},
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "3 method results, 1 library, metric: accuracy" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # by method, routing, and the k curve (bm25 at k = 1 and 2)
    tables = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert "routing_top1" in tables[0]["data"]["text/markdown"]
