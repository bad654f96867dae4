import json
import re

import pytest

import fluxlab
from fluxlab import records


def test_measure_writes_a_record_with_provenance(tmp_path, tiny, tiny_pipe):
    rec = fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="t", output_dir=tmp_path, warmup=1, repeats=2)
    on_disk = json.loads((tmp_path / "t--baseline.json").read_text())
    assert on_disk["timing"]["times_s"] == rec["timing"]["times_s"] and len(rec["timing"]["times_s"]) == 2
    assert rec["timing"]["min_s"] <= rec["timing"]["median_s"]
    assert records.missing_provenance(on_disk) == []
    prov = on_disk["provenance"]
    assert prov["versions"]["diffusers"] == "0.42.1" and prov["world_size"] == 1 and prov["device_count"] == 0
    assert len(prov["git_commit"]) >= 7
    assert on_disk["model_source"] == "tiny" and on_disk["settings"]["steps"] == 8
    assert (tmp_path / "t--baseline.png").is_file()


def test_tiny_records_name_their_weights(tmp_path, tiny, tiny_pipe):
    rec = fluxlab.measure(tiny_pipe, tiny, name="baseline", chapter="t", output_dir=tmp_path, repeats=1)
    assert re.fullmatch(r"[0-9a-f]{12}", rec["model_weights"]) and rec["model_weights"] == records.tiny_weights()
    assert fluxlab.report.source(rec) == "tiny"
    older = dict(rec, model_weights="0123456789ab")
    assert fluxlab.report.source(older) == fluxlab.report.source({k: v for k, v in rec.items() if k != "model_weights"})
    assert fluxlab.report.source(older) == "tiny (earlier training)"
    page = fluxlab.report.status_page([older], [dict(name="t", status="ok", duration_s=1.0)], "Status")
    assert "t: 1 `tiny` record(s) were made with a tiny pipeline trained before the one now bundled" in page


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


def test_write_refuses_a_record_without_provenance(tmp_path):
    with pytest.raises(ValueError, match="lacks provenance"):
        records.write(dict(name="x", provenance={}), tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_bad_repeat_counts(tiny, tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="repeats=0"):
        fluxlab.measure(tiny_pipe, tiny, name="b", chapter="t", output_dir=tmp_path, repeats=0)


def test_step_costs_follow_the_cache_decisions_and_adherence_is_scored(tmp_path, tiny, tiny_pipe):
    fluxlab.optimize(tiny_pipe, cache=0.3)
    rec = fluxlab.measure(tiny_pipe, tiny, name="c", chapter="t", output_dir=tmp_path, repeats=1, step_costs=True,
                          adherence=True)
    costs = rec["step_costs"]
    assert len(costs["seconds"]) == len(costs["computed"]) == tiny.steps and all(s > 0 for s in costs["seconds"])
    assert costs["computed"].count(False) == rec["cache"]["skipped"] > 0
    full = [s for s, c in zip(costs["seconds"], costs["computed"]) if c]
    skip = [s for s, c in zip(costs["seconds"], costs["computed"]) if not c]
    assert max(skip) < min(full)  # a skipped step runs one block of nine
    score = rec["adherence"]
    assert score["prompts"] == 66 and score["adherent"] <= min(score["background"], score["colour"], score["shape"])
    assert 0 < score["mean_skipped_steps"] < tiny.steps
    assert json.loads((tmp_path / "t--c.json").read_text())["adherence"] == score


TOPOLOGY = """\t\x1b[4mGPU0\tGPU1\tGPU2\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m
GPU0\t X \tNV18\tSYS\t0-31\t0\t\tN/A
GPU1\tNV18\t X \tSYS\t0-31\t0\t\tN/A
GPU2\tSYS\tSYS\t X \t32-63\t1\t\tN/A

Legend:

  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks
"""


def test_gpu_links_reads_the_topology_matrix():
    assert records.gpu_links(TOPOLOGY, 2) == "NV18"
    assert records.gpu_links(TOPOLOGY, 3) == "NV18, SYS"
    assert records.gpu_links("", 2) is None
