"""One validation of a request: every field's type and range, errors that name the field, the value and what is
allowed."""
import math

import pytest

import fluxlab
from fluxlab import parallel
from fluxlab.settings import SERVER_LIMITS, resolve_source


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=100), "height=100: must be a multiple of 16"),
    (dict(width=8), "width=8: must be an integer from 16 to 4096"),
    (dict(height=128.0), "height=128.0: must be an integer"),
    (dict(steps=0), "steps=0: must be an integer from 1 to 1000"),
    (dict(steps=True), "steps=True: must be an integer"),
    (dict(steps=2.5), "steps=2.5: must be an integer"),
    (dict(guidance=-1), "guidance=-1: must be a finite number from 0 to 100"),
    (dict(guidance=math.nan), "guidance=nan: must be a finite number"),
    (dict(guidance=math.inf), "guidance=inf: must be a finite number"),
    (dict(guidance="3.5"), "guidance='3.5': must be a finite number"),
    (dict(seed=-1), "seed=-1: must be an integer from 0 to 9223372036854775807"),
    (dict(seed=2**64), "seed=18446744073709551616: must be an integer"),
    (dict(seed="1"), "seed='1': must be an integer"),
    (dict(prompt=5), "prompt=5: must be a non-empty string"),
    (dict(prompt="   "), "prompt='   ': must be a non-empty string"),
    (dict(prompt="a \ud800 circle"), "prompt: not valid Unicode text .surrogates not allowed: '.{6}' at character 2"),
    (dict(prompt="x" * 30_000), "prompt of 30000 characters: at most 20000"),
    (dict(max_sequence_length=0), "max_sequence_length=0: must be an integer from 1 to 512"),
    (dict(model_source="flux-dev-randum"), "unknown model source 'flux-dev-randum'"),
    (dict(model_source=3), "model_source=3: must be a non-empty string"),
    (dict(model_source="/no/such/folder"), "no such folder"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(device="cuda:x"), "unknown device 'cuda:x'"),
])
def test_bad_settings_name_the_field_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fluxlab.check_settings(**kwargs)


def test_server_limits_are_stricter_and_configurable():
    with pytest.raises(ValueError, match="steps=101: must be an integer from 1 to 100"):
        fluxlab.check_settings(steps=101, limits=SERVER_LIMITS)
    with pytest.raises(ValueError, match="prompt of 2001 characters: at most 2000"):
        fluxlab.check_settings(prompt="y" * 2001, limits=SERVER_LIMITS)
    assert fluxlab.check_settings(steps=500, limits=fluxlab.Limits(max_steps=500)).steps == 500


def test_defaults_come_from_the_source():
    tiny = fluxlab.check_settings("tiny")
    assert (tiny.height, tiny.width, tiny.max_sequence_length) == (128, 128, 64)
    dev = fluxlab.check_settings("flux-dev-random", device="cpu")
    assert (dev.height, dev.width, dev.steps, dev.max_sequence_length, dev.guidance) == (1024, 1024, 28, 512, 3.5)
    assert dev.image_tokens == 4096
    assert tiny.prompt == "a large yellow circle on a blue background"  # its world is shapes
    assert dev.prompt == "A cat holding a sign that says hello world"  # the article's


def test_a_request_on_top_of_settings_is_checked_again():
    base = fluxlab.check_settings("tiny", device="cpu")
    assert base.with_request(seed=7, steps=4).seed == 7
    with pytest.raises(ValueError, match="seed=-3"):
        base.with_request(seed=-3)


def test_source_kinds(tmp_path):
    assert resolve_source("black-forest-labs/FLUX.1-dev").label == "real:black-forest-labs/FLUX.1-dev"
    assert resolve_source("real").location == "black-forest-labs/FLUX.1-dev"
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_source(str(tmp_path)).kind == "real"


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache=-0.1), "cache threshold=-0.1: must be a finite number from 0 to 1"),
    (dict(cache=math.nan), "cache threshold=nan"),
    (dict(cache=True), "cache threshold=True"),
    (dict(fp8="int4"), "allowed values are \\('rowwise', 'tensorwise'\\)"),
    (dict(compile="everything"), "allowed values are \\('regional', 'full'\\)"),
    (dict(graphs=True, compile="full"), "graphs=True captures each block"),
    (dict(offload="disk"), "offload='disk': allowed values are \\('model', 'sequential', 'encoders', 'group'\\)"),
    (dict(offload="model", graphs=True), "offload moves the weights that CUDA graphs replay"),
    (dict(offload="group", compile="regional"), "offload='group' streams each layer's weights in as it runs"),
    (dict(attention="cudnn_fp8", parallel=(1, 2)), "not in ring attention"),
    (dict(attention="flash9"), "attention='flash9': use 'cudnn_fp8' \\(FP8 on Hopper\\) or one of diffusers' backends"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fluxlab.check_options(**kwargs)


def test_parallel_split_checks_suggest_only_fixes_that_work():
    tiny = fluxlab.check_settings("tiny")  # 64 image tokens, 64 text tokens, 6 heads
    parallel.check_split(tiny, 4, 2)
    parallel.check_split(tiny, 4, 1)
    with pytest.raises(ValueError, match="6 attention heads do not split over ulysses_degree=4") as err:
        parallel.check_split(tiny, 4, 4)
    assert "ulysses_degree x ring_degree = 1 x 4 or 2 x 2" in str(err.value)
    with pytest.raises(ValueError) as err:
        parallel.check_split(fluxlab.check_settings("tiny", height=192, width=192), 3, 3)
    message = str(err.value)
    assert "64 text tokens (max_sequence_length) do not split evenly over 3" in message
    assert "max_sequence_length=63" in message and "heads" not in message  # 6 heads split over 3
    fixed = fluxlab.check_settings("tiny", height=192, width=192, max_sequence_length=63)
    parallel.check_split(fixed, 3, 3)  # the suggested fix works
    with pytest.raises(ValueError, match="height=144"):  # 8x8 image tokens over 3: 144 = 9 rows of patches
        parallel.check_split(fluxlab.check_settings("tiny", max_sequence_length=63), 3, 3)
    parallel.check_split(fluxlab.check_settings("tiny", height=144, max_sequence_length=63), 3, 3)
    assert parallel.degrees(4) == (4, 1)
    assert parallel.degrees(4, ring=2) == (2, 2)
    with pytest.raises(ValueError, match="must equal the number of processes"):
        parallel.degrees(4, 3, 1)
