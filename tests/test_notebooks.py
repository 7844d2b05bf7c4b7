"""Every notebook in notebooks/ runs top to bottom at small size.

Each notebook has a parameter cell (tagged ``parameters``) that reads ``TTTLA_NB_SMALL``;
with ``TTTLA_NB_SMALL=1`` the sizes shrink and the gradient checks are skipped, so a
notebook finishes in well under a minute of CPU on 2 cores. The kernel also gets XLA's
cheapest CPU compilation flags (the small runs are compile-bound; no number printed at small
size is meaningful). Any exception in any cell fails the test.

The committed notebooks must carry the outputs of a real full-size run (a reader sees the
plots without running anything): checked by :func:`test_committed_with_outputs`.

Needs ``nbclient``, ``nbformat``, ``ipykernel`` and ``matplotlib``; if they are missing the
tests fail (they do not skip) with the install command.
"""
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
NEEDED = ("nbclient", "nbformat", "ipykernel", "matplotlib")


def _require():
    missing = []
    for mod in NEEDED:
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        pytest.fail(f"notebook tests need {missing}: pip install {' '.join(NEEDED)} "
                    "(or the package's `test` extra)", pytrace=False)


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    for want in ("01_ttt_is_linear_attention.ipynb", "02_anomalies.ipynb",
                 "03_speed_and_scaling.ipynb"):
        assert want in names, f"notebooks/{want} missing; found {sorted(names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    _require()
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "TTTLA_NB_SMALL" in tagged[0].source, \
        f"{path.name}: expected one code cell tagged 'parameters' reading TTTLA_NB_SMALL"
    unexecuted = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not unexecuted, f"{path.name}: code cells {unexecuted} were committed without being run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: committed with an error output: {errors[0].get('ename')}"
    pngs = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert pngs, f"{path.name}: committed without its plots"
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "size: full" in text and "size: small" not in text, \
        f"{path.name}: the committed outputs are not from a full-size run (no 'size: full' line)"


#: run at small size in the default suite; the others (same machinery, ~45 s together) @slow
SMALL_RUN_DEFAULT = ("01_ttt_is_linear_attention",)


@pytest.mark.parametrize("path", [p if p.stem in SMALL_RUN_DEFAULT else pytest.param(p, marks=pytest.mark.slow)
                                  for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_notebook_runs_at_small_size(path, monkeypatch):
    _require()
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("TTTLA_NB_SMALL", "1")
    monkeypatch.setenv("XLA_FLAGS", FAST_XLA)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    nb.cells.append(nbformat.v4.new_code_cell("assert SMALL, 'TTTLA_NB_SMALL=1 was not picked up'"))
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
