import importlib.util

from conftest import ROOT

spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def test_requirements_are_the_projects_plus_the_runner_and_the_server():
    reqs = wheelhouse.requirements()
    assert "diffusers==0.42.1" in reqs and "papermill==2.7.0" in reqs
    assert any(r.startswith("fastapi==") for r in reqs) and any(r.startswith("uvicorn==") for r in reqs)
    assert not any(r.startswith("jupyter-book") for r in reqs)  # the book is rendered elsewhere
    assert not any(r.startswith(("fastapi", "uvicorn")) for r in wheelhouse.requirements(serve=False))


def test_select_leaves_out_the_gpu_stack_and_what_the_target_has():
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in
                          [("torch", "2.11.0"), ("nvidia-cublas", "13.0"), ("triton", "3.6"), ("Diffusers", "0.42.1"),
                           ("numpy", "2.5"), ("jupyter_client", "8.10.0"), ("debugpy", "1.8"), ("jedi", "0.20")]]}
    assert wheelhouse.select(report, {"numpy"}) == ["diffusers==0.42.1", "jupyter-client==8.10.0"]


def test_pins_replace_requirements():
    out = wheelhouse.with_pins(["torchao==0.18.0", "diffusers==0.42.1"], ["torchao==0.17.0"])
    assert out == ["diffusers==0.42.1", "torchao==0.17.0"]


def test_a_kernel_that_papermill_runs_never_imports_what_is_left_out(tmp_path):
    import os
    import subprocess
    import sys

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    for name in wheelhouse.HEADLESS_UNUSED:  # each one importable only as an error
        (tmp_path / "absent" / name).mkdir(parents=True)
        (tmp_path / "absent" / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed')")
    nbformat.write(new_notebook(cells=[new_code_cell("import IPython\n6 * 7")]), tmp_path / "in.ipynb")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "absent"))
    done = subprocess.run([sys.executable, "-m", "papermill", "-k", "python3", str(tmp_path / "in.ipynb"),
                           str(tmp_path / "out.ipynb")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = nbformat.read(tmp_path / "out.ipynb", 4).cells[0].outputs
    assert out[0]["data"]["text/plain"] == "42"
