"""Timing core: timed_generate's stage/step bookkeeping, Clock, summarize, run_rows, the stage latency table.

CPU only, the tiny model (same architecture as MolmoE-1B, scaled down). Fast: well under 20 s.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import e1.latency.timing
from e1.latency.table import SHARED, stage_latency
from e1.model.arch import load_arch
from e1.latency.measure import run_rows
from e1.latency.stats import summarize
from e1.names import STAGES
from e1.latency.timing import CONVENTION, Clock, RunTiming, timed_generate
from fakes import measure_summary, write

ARCH = load_arch("molmoe-1b-tiny")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runs(model, inp):
    return {n: timed_generate(model, inp, n) for n in (1, 2, 5)}


# --- timed_generate --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5])
def test_step_count_and_stage_keys(runs, n):
    t = runs[n]
    assert len(t.decode_steps_ms) == n - 1  # 1 prefill forward + N-1 decode steps
    assert list(t.stages_ms) == list(STAGES) == ["vision_encoder", "projector", "prefill", "decode"]
    assert t.tokens.shape == (n,)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_decode_is_sum_of_steps(runs, n):
    t = runs[n]
    assert t.stages_ms["decode"] == pytest.approx(sum(t.decode_steps_ms), abs=1e-9)
    if n == 1:
        assert t.decode_steps_ms == []
        assert t.stages_ms["decode"] == 0.0


@pytest.mark.parametrize("n", [1, 2, 5])
def test_all_times_non_negative(runs, n):
    t = runs[n]
    assert all(v >= 0 for v in t.stages_ms.values()), t.stages_ms
    assert all(v >= 0 for v in t.decode_steps_ms), t.decode_steps_ms
    assert t.e2e_ms > 0
    # the vision encoder and prefill do real work: a zero there would mean a mark is misplaced
    assert t.stages_ms["vision_encoder"] > 0 and t.stages_ms["prefill"] > 0


@pytest.mark.parametrize("n", [1, 2, 5])
def test_unattributed_is_e2e_minus_stages(runs, n):
    t = runs[n]
    assert t.unattributed_ms == pytest.approx(t.e2e_ms - sum(t.stages_ms.values()), abs=1e-9)
    # On the CPU every mark is the host clock and all marks lie between start() and stop().
    assert t.unattributed_ms >= 0
    assert sum(t.stages_ms.values()) <= t.e2e_ms


@pytest.mark.parametrize("n", [0, -1])
def test_non_positive_length_is_rejected(model, inp, n):
    with pytest.raises(ValueError, match="new_tokens"):
        timed_generate(model, inp, n)


@torch.inference_mode()
def _greedy_reference(model, inp, n: int) -> torch.Tensor:
    """Greedy tokens from the stage API, written independently of timed_generate."""
    emb = model.project(model.encode_images(inp.crops), inp.patch_masks)
    logits, cache = model.prefill(inp.input_ids, emb, inp.feature_index, inp.token_position)
    out = [int(logits[0].argmax())]
    for _ in range(n - 1):
        logits, cache = model.decode_step(torch.tensor([[out[-1]]], dtype=torch.long), cache)
        out.append(int(logits[0].argmax()))
    return torch.tensor(out, dtype=torch.long)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_tokens_are_greedy(model, inp, runs, n):
    ref = _greedy_reference(model, inp, n)
    assert runs[n].tokens.dtype == torch.long
    assert torch.equal(runs[n].tokens.cpu(), ref), (runs[n].tokens, ref)


def test_longer_run_extends_shorter(runs):
    """Fixed-length greedy decoding is a prefix-stable process."""
    assert torch.equal(runs[5].tokens[:2], runs[2].tokens)
    assert torch.equal(runs[2].tokens[:1], runs[1].tokens)


# --- Clock (CPU) -------------------------------------------------------------------------------------

class FakeClock:
    """Stands in for the `time` module inside e1.latency.timing: perf_counter only moves when slept."""

    def __init__(self, t0: float = 1000.0):
        self.now = t0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_clock_intervals_are_consecutive_mark_differences(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(e1.latency.timing, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    sleeps = [0.003, 0.0, 0.0125, 0.5]
    c = Clock(CPU, n_marks=len(sleeps) + 1)
    assert not c.cuda
    c.start()
    marks = []
    c.mark()
    marks.append(fake.now)
    for s in sleeps:
        fake.sleep(s)
        c.mark()
        marks.append(fake.now)
    fake.sleep(0.25)
    e2e = c.stop()
    iv = c.intervals_ms()
    assert len(iv) == len(sleeps)
    assert iv == pytest.approx([(b - a) * 1e3 for a, b in zip(marks, marks[1:])])
    assert iv == pytest.approx([s * 1e3 for s in sleeps])
    assert e2e == pytest.approx((sum(sleeps) + 0.25) * 1e3)


def test_clock_interval_covers_real_sleep():
    sleep_s = 0.02
    c = Clock(CPU, n_marks=3)
    c.start()
    c.mark()
    time.sleep(sleep_s)
    c.mark()
    c.mark()
    e2e = c.stop()
    iv = c.intervals_ms()
    assert len(iv) == 2
    assert iv[0] >= sleep_s * 1e3
    assert iv[1] >= 0
    assert e2e >= sum(iv)


def test_clock_restart_resets_marks(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(e1.latency.timing, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    c = Clock(CPU, n_marks=2)
    c.start(); c.mark(); fake.sleep(1.0); c.mark(); c.stop()
    c.start(); c.mark(); fake.sleep(0.5); c.mark(); c.stop()
    assert c.intervals_ms() == pytest.approx([500.0])


# --- summarize ---------------------------------------------------------------------------------------

KNOWN = [
    [1.0, 2.0, 3.0, 4.0],
    list(range(1, 11)),
    [5.5, 0.25, 3.0, 3.0, 100.0, 7.75, 2.0],
    np.random.default_rng(0).gamma(2.0, 10.0, 37).tolist(),
]


@pytest.mark.parametrize("values", KNOWN)
def test_summarize_matches_numpy(values):
    v = np.asarray(values, dtype=np.float64)
    s = summarize(values)
    assert set(s) == {"mean_ms", "median_ms", "p95_ms", "p99_ms", "std_ms", "min_ms", "max_ms", "n", "cv"}
    assert s["n"] == len(values) and isinstance(s["n"], int)
    assert s["mean_ms"] == pytest.approx(v.mean())
    assert s["median_ms"] == pytest.approx(np.median(v))
    assert s["p95_ms"] == pytest.approx(np.percentile(v, 95, method="linear"))
    assert s["p99_ms"] == pytest.approx(np.percentile(v, 99, method="linear"))
    assert s["std_ms"] == pytest.approx(v.std(ddof=1))
    assert s["min_ms"] == v.min() and s["max_ms"] == v.max()
    assert s["cv"] == pytest.approx(v.std(ddof=1) / v.mean())
    json.dumps(s)  # plain Python numbers: serializable as is


def test_summarize_hand_values():
    # [1, 2, 3, 4]: linear interpolation at rank q*(n-1) = 0.95*3 = 2.85 -> 3 + 0.85 = 3.85; 0.99*3 -> 3.97
    # sample std: deviations 1.5, .5, .5, 1.5 -> (2.25+.25+.25+2.25)/3 = 5/3
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s["mean_ms"] == 2.5 and s["median_ms"] == 2.5
    assert s["p95_ms"] == pytest.approx(3.85)
    assert s["p99_ms"] == pytest.approx(3.97)
    assert s["std_ms"] == pytest.approx((5 / 3) ** 0.5)
    assert s["cv"] == pytest.approx((5 / 3) ** 0.5 / 2.5)
    assert (s["min_ms"], s["max_ms"], s["n"]) == (1.0, 4.0, 4)


def test_summarize_single_value():
    s = summarize([7.0])
    assert s["std_ms"] == 0.0 and s["cv"] == 0.0
    assert s["mean_ms"] == s["median_ms"] == s["p95_ms"] == s["p99_ms"] == s["min_ms"] == s["max_ms"] == 7.0
    assert s["n"] == 1


def test_summarize_accepts_iterators():
    assert summarize(x for x in [1.0, 3.0])["mean_ms"] == 2.0


def test_summarize_empty_raises():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize(np.array([]))


# --- run_rows ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 5])
def test_run_rows_from_a_real_run(runs, n):
    t = runs[n]
    rows = run_rows("cfg", 3, 1.5, t)
    assert len(rows) == 1 + 4 + 2 + (n - 1)
    assert all(r[0] == "cfg" and r[1] == 3 for r in rows)
    by_stage = {r[2]: r for r in rows if r[2] != "decode_step"}
    assert list(by_stage) == ["preprocess", *STAGES, "e2e", "unattributed"]
    assert all(r[3] == -1 for r in by_stage.values())
    assert by_stage["preprocess"][4] == 1.5
    for s in STAGES:
        assert by_stage[s][4] == t.stages_ms[s]
    assert by_stage["e2e"][4] == t.e2e_ms
    assert by_stage["unattributed"][4] == t.unattributed_ms
    steps = [r for r in rows if r[2] == "decode_step"]
    assert [r[3] for r in steps] == list(range(1, n))
    assert [r[4] for r in steps] == t.decode_steps_ms


def test_run_rows_synthetic():
    t = RunTiming(stages_ms={"vision_encoder": 1.0, "projector": 2.0, "prefill": 3.0, "decode": 9.0},
                  decode_steps_ms=[4.0, 5.0], e2e_ms=20.0, tokens=torch.zeros(3, dtype=torch.long))
    rows = run_rows("x", 0, 0.5, t)
    assert rows == [
        ("x", 0, "preprocess", -1, 0.5),
        ("x", 0, "vision_encoder", -1, 1.0),
        ("x", 0, "projector", -1, 2.0),
        ("x", 0, "prefill", -1, 3.0),
        ("x", 0, "decode", -1, 9.0),
        ("x", 0, "e2e", -1, 20.0),
        ("x", 0, "unattributed", -1, 5.0),
        ("x", 0, "decode_step", 1, 4.0),
        ("x", 0, "decode_step", 2, 5.0),
    ]


# --- the stage latency table --------------------------------------------------------------------------

def _write(tmp_path, summaries):
    return [write(tmp_path / f"{s['id']}.json", s) for s in summaries]


def test_stage_latency_writes_meta_and_configs(tmp_path):
    paths = _write(tmp_path, [measure_summary("a", build_s=0.1), measure_summary("b", build_s=0.2)])
    out = tmp_path / "sub" / "table.json"
    result = stage_latency(paths, out)
    on_disk = json.loads(out.read_text())
    assert on_disk == result
    assert set(on_disk) == {"meta", "configs"}
    assert [c["id"] for c in on_disk["configs"]] == ["a", "b"]
    assert all("meta" not in c for c in on_disk["configs"])
    meta = on_disk["meta"]
    for k in (*SHARED, "device_type", "convention"):
        assert k in meta
    assert meta["model"] == "molmoe-1b-tiny" and meta["convention"] == CONVENTION
    assert meta["build_s"] == [0.1, 0.2]
    assert meta["tokens_identical_across_runs"] is True


@pytest.mark.parametrize("key,other", [("model", "molmoe-1b"), ("device", "NVIDIA H100"), ("dtype", "bfloat16")])
def test_stage_latency_refuses_to_mix_setups(tmp_path, key, other):
    paths = _write(tmp_path, [measure_summary("a"), measure_summary("b"), measure_summary("c", **{key: other})])
    out = tmp_path / "table.json"
    with pytest.raises(ValueError, match=key) as err:
        stage_latency(paths, out)
    assert other in str(err.value) and str(paths[2]) in str(err.value)
    assert not out.exists()


def test_stage_latency_empty_raises(tmp_path):
    with pytest.raises(ValueError):
        stage_latency([], tmp_path / "table.json")


def test_cuda_request_without_gpu_is_refused(monkeypatch):
    """A job asked to measure on cuda never falls back to the CPU."""
    from e1.jobs.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="refusing to measure on the CPU"):
        resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
