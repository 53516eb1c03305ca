"""notebooks/quickstart.ipynb runs top to bottom without errors and shows its answer and plots."""

from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

from tests import ROOT


def test_quickstart_notebook_executes():
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    env_model = os.environ.pop("VIDEONSA_MODEL", None)  # the notebook's own tiny model, not a local checkpoint
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    finally:
        if env_model is not None:
            os.environ["VIDEONSA_MODEL"] = env_model
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "prediction:" in text and "parsed letter:" in text
    assert "2 NSA layers of 2" in text and "g_cmp" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2  # the sampled frames and the gates
