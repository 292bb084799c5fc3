"""The ablation notebooks run top to bottom on the demo (parameters cell overridden to small sizes)."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def run_notebook(name: str, **parameters) -> dict:
    """Executes the code cells of notebooks/<name> in order in one namespace, from notebooks/ (as
    Jupyter does), with `parameters` replacing the values of the cell tagged "parameters"
    (papermill's convention). Returns the namespace."""
    with open(os.path.join(NOTEBOOKS, name)) as f:
        notebook = json.load(f)
    assert notebook["nbformat"] == 4
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(not cell["outputs"] for cell in cells), "notebooks are committed without outputs"
    tagged = [i for i, cell in enumerate(cells) if "parameters" in cell["metadata"].get("tags", [])]
    assert len(tagged) == 1, "one cell tagged 'parameters'"
    namespace = {"__name__": "__main__"}
    cwd = os.getcwd()
    os.chdir(NOTEBOOKS)
    try:
        for i, cell in enumerate(cells):
            exec(compile("".join(cell["source"]), f"{name} code cell {i}", "exec"), namespace)  # noqa: S102
            if i == tagged[0]:
                unknown = set(parameters) - set(namespace)
                assert not unknown, f"not parameters of {name}: {unknown}"
                namespace.update(parameters)
    finally:
        os.chdir(cwd)
    return namespace


def test_every_notebook_is_tested():
    assert sorted(os.listdir(NOTEBOOKS)) == ["cdir_threshold.ipynb", "reward_weights.ipynb"]


@pytest.mark.slow
def test_cdir_threshold_notebook(tmp_path, capsys):
    namespace = run_notebook("cdir_threshold.ipynb", LIMIT=4, WORKDIR=str(tmp_path))
    curve, metrics = namespace["curve"], namespace["metrics"]
    assert list(curve) == namespace["THRESHOLDS"] and metrics["cdir_threshold"] == 1.0
    assert curve[0.0]["consulted"] == 0 and curve[0.0]["accuracy"] == metrics["accuracy_first_pass"]
    assert curve[1.0] == {"accuracy": metrics["accuracy"], "consulted": metrics["cdir_consulted"]}
    assert "threshold  consulted  accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_reward_weights_notebook(tmp_path, capsys):
    variants = {"accuracy + format": {"accuracy": 1.0, "format": 1.0},
                "with length": {"accuracy": 1.0, "format": 1.0, "length": 1.0}}
    namespace = run_notebook("reward_weights.ipynb", STEPS=1, EVAL_LIMIT=4, VARIANTS=variants, WORKDIR=str(tmp_path))
    assert list(namespace["results"]) == list(variants)
    assert all(metrics["num_records"] == 4 for metrics in namespace["results"].values())
    assert sorted(os.listdir(tmp_path)) == ["accuracy_format", "with_length"]
    assert os.path.isfile(tmp_path / "with_length" / "hf_export" / "model.safetensors")
    assert "accuracy + format" in capsys.readouterr().out
