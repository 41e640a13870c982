"""Issue 12 on the CPU: experts 'auto', the generate() check, host overhead pairs, the host microbenchmark,
memory per stage, and what a job costs outside its runs (the GPU numbers come from the H200 runs)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from e1.findings import fidelity_check, host_warnings, job_cost_text, launch_overhead
from e1.jobs.hostbench import host_bench
from e1.jobs.spec import FidelityJob
from e1.latency.fidelity import fidelity
from e1.latency.measure import job_time
from e1.latency.memory import stage_memory
from e1.latency.table import job_cost, read_fidelity, stage_latency
from e1.latency.timing import timed_generate
from fakes import KNOBS, VARIANT, measure_summary, write
from e1.inputs.images import write_image
from e1.inputs.prompts import make_prompt
from e1.jobs.io import write_json
from e1.model.arch import load_arch


def test_auto_experts_follow_the_library_and_record_each_stage(model, inp):
    assert model.experts_knob == "auto"  # the default (e1.knobs)
    t = timed_generate(model, inp, 3)
    # CPU: transformers' decode policy switches only off the CPU, so both stages run its default
    assert t.experts == {"prefill": "grouped_mm", "decode": "grouped_mm"}


def test_decode_policy_is_the_librarys_own(model, monkeypatch):
    """Off the CPU the installed transformers switches grouped_mm to batched_mm for decoding (generate()'s
    policy, read from the library, not hard-coded): simulated here by reporting a CUDA device to it."""
    causal = model.causal_lm
    monkeypatch.setattr(type(causal), "device", property(lambda self: torch.device("cuda")))
    with model.decode_experts():
        inside = model.experts_in_use()
    assert (inside, model.experts_in_use()) == ("batched_mm", "grouped_mm")  # switched, then restored


def _pair(cid, backend, ms):
    s = measure_summary(cid, {"vision_encoder": ms, "projector": ms, "prefill": ms, "decode": ms}, ms)
    s["knobs"] = {**KNOBS, "backend": backend}
    s["variant"] = VARIANT.replace("eager", backend)
    return s


def test_host_overhead_pairs_eager_with_its_graph_twin(tmp_path):
    rows = [_pair("e", "eager", 10.0), _pair("g", "cuda_graph", 4.0)]
    table = stage_latency([write(tmp_path / f"{r['id']}.json", r) for r in rows], tmp_path / "t.json")
    eager, graph = table["configs"]
    assert eager["host_overhead"]["graph_twin"] == "g" and "host_overhead" not in graph
    assert eager["host_overhead"]["ms"]["prefill"] == pytest.approx(6.0)
    assert eager["host_overhead"]["share"]["decode_step"] == pytest.approx(0.6)
    lo = launch_overhead(table["configs"], {"points": []})
    assert lo["measured"] and lo["overhead_share"]["prefill"] == [pytest.approx(0.6)]
    assert "60.0 %" in lo["text"]
    alone = stage_latency([write(tmp_path / "e.json", rows[0])], tmp_path / "t1.json")
    assert launch_overhead(alone["configs"], {"points": []})["measured"] is False


def test_host_warning_needs_a_host_bound_stage_on_a_slow_host(tmp_path):
    rows = [_pair("e", "eager", 10.0), _pair("g", "cuda_graph", 4.0), _pair("e2", "eager", 10.0)]
    rows[2]["image"] = rows[2]["id"] = "e2"
    for r, launch in zip(rows, (20.0, 5.0, 5.0)):
        r["meta"]["host_bench"] = {"launch_us": launch}
    table = stage_latency([write(tmp_path / f"{r['id']}.json", r) for r in rows], tmp_path / "t.json")
    warnings = host_warnings(table["configs"])
    assert len(warnings) == 1 and warnings[0].startswith("e: host-bound vision_encoder, projector, prefill, decode")
    assert "kernel launch 20.0 µs vs the run's median 5.0 µs" in warnings[0]


def test_job_time_and_cost():
    marks = {"shell_start": 0.0, "python_start": 0.5, "measure_start": 3.0, "runs_start": 5.0, "runs_end": 15.0,
             "end": 16.0}
    t = job_time(marks)
    assert t["total_s"] == 16.0 and t["runs_s"] == 10.0 and t["outside_runs_s"] == 6.0
    assert t["steps_s"]["python_start->measure_start"] == 2.5
    later = job_time({k: v + 20.0 for k, v in marks.items()})
    cost = job_cost([{"meta": {"job_time": t}}, {"meta": {"job_time": later}}])
    assert cost["outside_runs_s"]["median"] == 6.0 and cost["gap_between_jobs_s"]["median"] == 4.0
    assert "6.0 s (median; 6.0–6.0) outside their warm-up and timed runs" in job_cost_text(cost)


def test_hostbench_and_memory_on_the_cpu(model, inp):
    b = host_bench(torch.device("cpu"))
    assert b["dispatch_us"] > 0 and b["launch_us"] is None and b["ops"] == 1000
    m = stage_memory(model, inp, 3)
    assert m == {"measured": False, "why": "device memory is measured on CUDA devices only"}


def test_fidelity_job_on_the_tiny_model(tmp_path):
    arch = load_arch("molmoe-1b-tiny")
    write_image(tmp_path / "i.png", 336, 336)
    write_json(tmp_path / "p.json", make_prompt(arch, "short", 16, None, None))
    spec = FidelityJob(id="f", model="molmoe-1b-tiny", device="cpu", dtype="float32", weights="random", seed=0,
                       variant=VARIANT, knobs=KNOBS, image="336x336", image_path=str(tmp_path / "i.png"),
                       prompt="short", prompt_path=str(tmp_path / "p.json"), decode_tokens=6, pairs=3)
    r = fidelity(spec, tmp_path / "f.json")
    assert r["tokens_equal"] is True and r["first_mismatch"] is None
    assert len(r["e1_ms"]) == len(r["generate_ms"]) == 3 and r["ratio_e1_over_generate"] > 0
    assert r["experts_used"]["e1"] == r["experts_used"]["generate"]
    assert read_fidelity(tmp_path / "f.json")["id"] == "f"
    assert "tokens equal in 1 of 1" in fidelity_check([r])["text"]
    graph = copy.deepcopy(spec.__dict__) | {"knobs": {**KNOBS, "backend": "cuda_graph"}}
    with pytest.raises(ValueError, match="compares eager variants only"):
        fidelity(FidelityJob(**graph), tmp_path / "g.json")
    assert json.loads((tmp_path / "f.json").read_text())["convention"].startswith("Per image and eager variant")
