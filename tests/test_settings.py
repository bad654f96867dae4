import pytest

import fluxlab
from fluxlab import parallel
from fluxlab.settings import resolve_source


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=100), "height=100: must be a positive multiple of 16"),
    (dict(width=1000), "width=1000: must be a positive multiple of 16"),
    (dict(steps=0), "steps=0: must be an integer >= 1"),
    (dict(model_source="flux-dev-randum"), "unknown model source 'flux-dev-randum'"),
    (dict(model_source="/no/such/folder"), "no such folder"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(max_sequence_length=0), "max_sequence_length=0"),
])
def test_bad_settings_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        fluxlab.settings(**kwargs)
    assert "must" in str(err.value) or "allowed" in str(err.value).lower()  # says what is allowed


def test_defaults_come_from_the_source():
    tiny = fluxlab.settings("tiny")
    assert (tiny.height, tiny.width, tiny.max_sequence_length) == (128, 128, 64)
    dev = fluxlab.settings("flux-dev-random", device="cpu")
    assert (dev.height, dev.width, dev.steps, dev.max_sequence_length, dev.guidance) == (1024, 1024, 28, 512, 3.5)
    assert dev.image_tokens == 4096
    assert tiny.prompt == "a large yellow circle on a blue background"  # its world is shapes
    assert dev.prompt == "A cat holding a sign that says hello world"  # the article's
    assert fluxlab.settings("tiny", prompt="a small red square on a white background").prompt.startswith("a small")


def test_source_kinds(tmp_path):
    assert resolve_source("black-forest-labs/FLUX.1-dev").label == "real:black-forest-labs/FLUX.1-dev"
    assert resolve_source("real").location == "black-forest-labs/FLUX.1-dev"
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_source(str(tmp_path)) .kind == "real"


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache=-0.1), "must be a number >= 0"),
    (dict(fp8="int4"), "allowed values are \\('rowwise', 'tensorwise'\\)"),
    (dict(compile="everything"), "allowed values are \\('regional', 'full'\\)"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fluxlab.check_options(**kwargs)


def test_parallel_split_checks():
    tiny = fluxlab.settings("tiny")  # 64 image tokens, 64 text tokens, 6 heads
    parallel.check_split(tiny, 4, 2)
    parallel.check_split(tiny, 4, 1)
    with pytest.raises(ValueError, match="6 attention heads do not split over ulysses_degree=4"):
        parallel.check_split(tiny, 4, 4)
    with pytest.raises(ValueError, match="do not split evenly over 3 processes"):
        parallel.check_split(tiny, 3, 3)
    with pytest.raises(ValueError, match="6 attention heads do not split over ulysses_degree=8"):
        parallel.check_split(fluxlab.settings("tiny", height=256, width=256), 8, 8)
    assert parallel.degrees(4) == (4, 1)
    assert parallel.degrees(4, ring=2) == (2, 2)
    with pytest.raises(ValueError, match="must equal the number of processes"):
        parallel.degrees(4, 3, 1)
