"""Executes every notebook in notebooks/ top to bottom (nbclient, CPU, the tiny model) and checks git holds no outputs.

The kernel is this interpreter (a kernelspec written to a temp folder whose argv is `sys.executable`), so a clean
shell runs the notebooks with the project's venv, not whatever `python` is first on PATH. The GBox cells run against
the local fake (`tests/fakes/gbox_server.py`), selected by `GBOX_CLIENT_BASE_URL` as the notebooks' first cells say;
the test checks the fake really served them and that no box was left running. A notebook's run writes to a temp
folder (`OUTPUT_DIR`, read by cua_kit.config), never to the repo.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from tests.fakes.gbox_server import FakeGboxServer

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_environments.ipynb", "02_policy_and_rollout.ipynb", "03_grpo_step_by_step.ipynb",
         "04_train_and_watch.ipynb", "05_gbox.ipynb"]
CELL_TIMEOUT_S = 180  # the budget is 3 minutes a notebook; no single cell may take longer
MAX_COMMITTED_OUTPUT_BYTES = 2_000  # "stripped or small": a committed notebook carries no images


def kernel_manager(folder: Path) -> KernelManager:
    """A KernelManager for kernel "python3" that runs this very interpreter."""
    spec_dir = folder / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (cua-kit venv)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.fixture
def gbox_fake(fake_gbox: FakeGboxServer) -> FakeGboxServer:
    return fake_gbox  # conftest.py starts it


def test_committed_notebooks_have_no_outputs() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        outputs = json.dumps([c.outputs for c in code])
        assert len(outputs) <= MAX_COMMITTED_OUTPUT_BYTES, f"{name}: strip its outputs before committing"
        assert all(c.execution_count is None for c in code), f"{name}: clear execution counts before committing"
        # the parameters sit in one tagged cell at the top (after the title), so a GPU user edits one line
        assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell must be the parameters"
        if name != "01_environments.ipynb":
            assert 'MODEL = "builtin:qwen3_vl-tiny"' in code[0].source, name


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name: str, tmp_path: Path, gbox_fake: FakeGboxServer,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may reach for the Hub
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temp folders (frames, screenshots) die with tmp_path
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) on the first failing cell
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    if name in ("01_environments.ipynb", "05_gbox.ipynb"):
        endpoints = {r["endpoint"] for r in gbox_fake.requests}
        assert {"create", "terminate"} <= endpoints, f"{name} did not drive the GBox fake: {endpoints}"
        assert gbox_fake.live_boxes() == [], f"{name} left boxes running"
    if name == "04_train_and_watch.ipynb":
        assert list((tmp_path / "outputs").rglob("trace.db")), "the training run wrote no trace.db"
