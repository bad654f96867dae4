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


def test_select_leaves_out_the_gpu_stack_and_what_the_target_has():
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in
                          [("torch", "2.11.0"), ("nvidia-cublas", "13.0"), ("triton", "3.6"), ("Diffusers", "0.42.1"),
                           ("numpy", "2.5"), ("jupyter_client", "8.10.0")]]}
    assert wheelhouse.select(report, {"numpy"}) == ["diffusers==0.42.1", "jupyter-client==8.10.0"]


def test_pins_replace_requirements():
    out = wheelhouse.with_pins(["torchao==0.18.0", "diffusers==0.42.1"], ["torchao==0.17.0"])
    assert out == ["diffusers==0.42.1", "torchao==0.17.0"]
