"""Records: one schema, written by one function and read by one, checked on read; provenance; atomic writes."""
import json
import re

import pytest

import fluxlab
from fluxlab import records


def test_measure_writes_a_record_with_provenance(tmp_path, tiny, tiny_pipe):
    rec = fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="t", output_dir=tmp_path, warmup=1, repeats=2)
    (on_disk,) = records.read(tmp_path / "t--baseline.json")
    assert on_disk["timing"]["times_s"] == rec["timing"]["times_s"] and len(rec["timing"]["times_s"]) == 2
    assert rec["timing"]["min_s"] <= rec["timing"]["median_s"] and rec["schema"] == records.SCHEMA
    prov = on_disk["provenance"]
    assert prov["versions"]["diffusers"] == "0.42.1" and prov["world_size"] == 1 and prov["device_count"] == 0
    assert len(prov["git_commit"]) >= 7
    assert on_disk["model_source"] == "tiny" and on_disk["settings"]["steps"] == 8 and on_disk["optimizations"] == {}
    assert (tmp_path / "t--baseline.png").is_file()


def test_tiny_records_name_their_weights(tmp_path, tiny, tiny_pipe):
    rec = fluxlab.measure(tiny_pipe, tiny, name="b", chapter="t", output_dir=None, repeats=1)
    assert re.fullmatch(r"[0-9a-f]{12}", rec["model_weights"]) and rec["model_weights"] == records.tiny_weights()
    assert not list(tmp_path.iterdir())  # output_dir=None writes nothing


def test_records_never_hold_a_token(tmp_path, tiny, tiny_pipe, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="t", output_dir=tmp_path, repeats=1)
    assert "hf_secret" not in (tmp_path / "t--baseline.json").read_text()


def test_a_failed_run_keeps_the_good_record(tmp_path, tiny, tiny_pipe):
    fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="t", output_dir=tmp_path, repeats=1)
    good = (tmp_path / "t--baseline.json").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    tiny_pipe.__class__ = type("Broken", (tiny_pipe.__class__,), {"__call__": broken})
    with pytest.raises(RuntimeError, match="out of memory"):
        fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="t", output_dir=tmp_path, repeats=1)
    assert (tmp_path / "t--baseline.json").read_text() == good


@pytest.mark.parametrize("warmup, repeats", [(1, 0), (0, 1), (1, 2.0), (True, 1)])
def test_bad_repeat_counts(tiny, tiny_pipe, warmup, repeats):
    with pytest.raises(ValueError, match="both must be integers >= 1"):
        fluxlab.measure(tiny_pipe, tiny, name="b", chapter="t", output_dir=None, warmup=warmup, repeats=repeats)


def test_records_are_checked_on_write_and_on_read(tmp_path, tiny, tiny_pipe):
    rec = fluxlab.measure(tiny_pipe, tiny, name="b", chapter="t", output_dir=None, repeats=1)
    with pytest.raises(records.RecordError, match="lacks provenance.run_id"):
        records.write(tmp_path / "x.json", [dict(rec, provenance={**rec["provenance"], "run_id": ""})])
    assert not (tmp_path / "x.json").exists()
    bad = {k: v for k, v in rec.items() if k != "timing"}
    (tmp_path / "old.json").write_text(json.dumps(dict(records=[bad])))
    with pytest.raises(records.RecordError, match=r"old.json: record 'b' lacks the field 'timing'"):
        records.read(tmp_path / "old.json")
    (tmp_path / "v1.json").write_text(json.dumps(dict(records=[dict(rec, schema=1)])))
    with pytest.raises(records.RecordError, match="v1.json: record schema 1, this code reads schema 2"):
        records.read_folder(tmp_path, "v1.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(records.RecordError, match="expected an object with a list 'records'"):
        records.read(tmp_path / "list.json")


def test_step_costs_follow_the_cache_decisions(tmp_path, tiny, tiny_pipe):
    fluxlab.cache.enable(tiny_pipe.transformer, 0.3)
    rec = fluxlab.measure(tiny_pipe, tiny, name="c", chapter="t", output_dir=None, repeats=1,
                          extras={"step_costs": fluxlab.step_costs})
    costs = rec["extras"]["step_costs"]
    assert len(costs["seconds"]) == len(costs["computed"]) == tiny.steps and all(s > 0 for s in costs["seconds"])
    assert costs["computed"].count(False) == rec["cache"]["skipped"] > 0
    full = [s for s, c in zip(costs["seconds"], costs["computed"]) if c]
    skip = [s for s, c in zip(costs["seconds"], costs["computed"]) if not c]
    assert max(skip) < min(full)  # a skipped step runs one block of nine


TOPOLOGY = """\t\x1b[4mGPU0\tGPU1\tGPU2\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m
GPU0\t X \tNV18\tSYS\t0-31\t0\t\tN/A
GPU1\tNV18\t X \tSYS\t0-31\t0\t\tN/A
GPU2\tSYS\tSYS\t X \t32-63\t1\t\tN/A
"""


def test_gpu_links_reads_the_topology_matrix():
    assert records.gpu_links(TOPOLOGY, 2) == "NV18"
    assert records.gpu_links(TOPOLOGY, 3) == "NV18, SYS"
    assert records.gpu_links("", 2) is None


def test_a_given_commit_must_be_a_full_id(monkeypatch):
    """Where git is absent (a GPU machine with a copy of the tree), FLUXLAB_GIT_COMMIT names the commit: an
    abbreviation is refused before anything runs, so no record carries one."""
    monkeypatch.setenv("FLUXLAB_GIT_COMMIT", "7a23cd6")
    with pytest.raises(ValueError, match="give the full 40-character commit id"):
        records.git_commit()
    monkeypatch.setenv("FLUXLAB_GIT_COMMIT", "7a23cd6f4a3f9595dbc1076cebc0af3ccb55b715")
    assert records.git_commit() == "7a23cd6f4a3f9595dbc1076cebc0af3ccb55b715"
