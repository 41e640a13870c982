"""One GPU per job (e1.gpus) on a CPU machine: fake device ids, real processes, real flock.

Each claimant is a separate Python process (the lock lives as long as its process), started with fake
CUDA_VISIBLE_DEVICES ids and a temporary lock directory. A fake `nvidia-smi` first on PATH keeps the
tests hermetic on machines that have a real one: it fails, or lists two made-up GPUs.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e1.jobs import claims as gpus

REPO = Path(__file__).resolve().parents[1]

# Claims a GPU, reports the claim on stdout as one JSON line, then holds it until stdin closes.
HOLDER = """
import json, os, sys
from e1.jobs import claims as gpus
c = gpus.claim_for(sys.argv[1])
print(json.dumps({"claim": gpus.current(), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "order": os.environ.get("CUDA_DEVICE_ORDER"), "smi_id": gpus.smi_id(0)}), flush=True)
sys.stdin.read()
"""

SMI_FAILS = "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n"
SMI_TWO_GPUS = """#!/bin/sh
[ "$1" = "-L" ] || exit 3
echo "GPU 0: NVIDIA H200 (UUID: GPU-0a0a0a0a-1111-2222-3333-444444444444)"
echo "GPU 1: NVIDIA H200 (UUID: GPU-1b1b1b1b-5555-6666-7777-888888888888)"
echo "  MIG 1g.18gb     Device  0: (UUID: MIG-99999999-aaaa-bbbb-cccc-dddddddddddd)"
"""


def fake_smi(tmp_path: Path, script: str) -> Path:
    d = tmp_path / "bin"
    d.mkdir(parents=True, exist_ok=True)
    exe = d / "nvidia-smi"
    exe.write_text(script)
    exe.chmod(0o755)
    return d


@pytest.fixture
def env(tmp_path):
    """Environment of a claimant: fake ids 3 and 5, a temporary lock dir, a failing nvidia-smi."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "E1_GPU_", "CUDA_"))}
    e.update(PYTHONPATH=str(REPO / "src"), CUDA_VISIBLE_DEVICES="3,5", E1_GPU_LOCK_DIR=str(tmp_path / "locks"),
             PATH=f"{fake_smi(tmp_path, SMI_FAILS)}:{e['PATH']}", SPEC_DIR=str(tmp_path))
    return e


def start(env: dict, device: str = "cuda") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, device], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report(p: subprocess.Popen, timeout: float = 20.0) -> dict | None:
    """The claimant's JSON line, or None if it has not claimed within `timeout` seconds."""
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        return None
    line = p.stdout.readline()
    assert line, f"claimant exited without claiming: {p.wait()} {p.stderr.read()}"
    return json.loads(line)


def finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.stdin.close()
        p.wait(timeout=20)


def test_concurrent_jobs_claim_distinct_gpus_and_a_third_waits(env):
    a, b = start(env), start(env)
    try:
        ra, rb = report(a), report(b)
        assert {ra["claim"]["id"], rb["claim"]["id"]} == {"3", "5"}
        for r in (ra, rb):
            c = r["claim"]
            assert c["source"] == "lock" and c["candidates"] == ["3", "5"]
            assert c["cuda_visible_devices_before"] == "3,5"
            assert r["cvd"] == c["id"] == c["index"] and r["smi_id"] == c["id"]  # nvidia-smi asked for the claimed one
            assert r["order"] == "PCI_BUS_ID"  # an index means what nvidia-smi means by it
            assert Path(c["lock_file"]) == Path(env["E1_GPU_LOCK_DIR"]) / f"{c['id']}.lock"
            holder = json.loads(Path(c["lock_file"]).read_text())
            assert holder["gpu"] == c["id"] and holder["pid"] in (a.pid, b.pid)
        c3 = start(env)
        try:
            assert report(c3, timeout=2.0) is None  # both GPUs held: it waits
            freed = ra["claim"]["id"]
            finish(a)  # the first job ends
            r3 = report(c3)
            assert r3 is not None and r3["claim"]["id"] == freed and r3["cvd"] == freed
            assert r3["claim"]["waited_s"] > 1.0
            assert rb["claim"]["id"] != freed and b.poll() is None  # the other job still holds its own
        finally:
            finish(c3)
        err = c3.stderr.read()
        assert "all 2 GPUs are claimed by other jobs" in err and f"pid {a.pid}" in err, err
    finally:
        finish(a, b)


def test_a_killed_job_releases_its_gpu(env):
    a, b = start(env), start(env)
    try:
        ra, rb = report(a), report(b)
        os.kill(b.pid, signal.SIGKILL)  # no clean-up code runs: the kernel drops the flock
        b.wait(timeout=20)
        c3 = start(env)
        try:
            r3 = report(c3)
            assert r3 is not None and r3["claim"]["id"] == rb["claim"]["id"] != ra["claim"]["id"]
        finally:
            finish(c3)
    finally:
        finish(a, b)


def test_gpus_listed_by_nvidia_smi_are_claimed_by_uuid(env, tmp_path):
    del env["CUDA_VISIBLE_DEVICES"]
    env["PATH"] = f"{fake_smi(tmp_path / 'two', SMI_TWO_GPUS)}:{env['PATH']}"
    a, b = start(env), start(env)
    try:
        ra, rb = report(a), report(b)
        assert {ra["claim"]["index"], rb["claim"]["index"]} == {"0", "1"}
        for r in (ra, rb):
            c = r["claim"]
            assert c["uuid"].startswith("GPU-") and r["cvd"] == c["uuid"] == c["id"] == r["smi_id"]
            assert c["name"] == "NVIDIA H200" and len(c["candidates"]) == 2  # the MIG line is no GPU
            assert c["cuda_visible_devices_before"] is None and r["order"] is None
    finally:
        finish(a, b)


@pytest.mark.parametrize("slurm", [True, False])
def test_a_pinned_job_is_left_alone(env, slurm):
    env["CUDA_VISIBLE_DEVICES"] = "7"
    if slurm:
        env["SLURM_JOB_ID"] = "4242"
    p = start(env)
    try:
        r = report(p)
    finally:
        finish(p)
    assert r["cvd"] == "7" and r["order"] is None and r["smi_id"] == "7"
    assert r["claim"]["source"] == ("slurm" if slurm else "single")
    assert r["claim"]["lock_file"] is None
    assert not Path(env["E1_GPU_LOCK_DIR"]).exists()  # no lock taken, nothing written


def test_cpu_jobs_claim_nothing_unless_the_test_hook_is_set(env):
    p = start(env, device="cpu")
    try:
        r = report(p)
    finally:
        finish(p)
    assert r["claim"] is None and r["cvd"] == "3,5"
    env["E1_GPU_CLAIM_ON_CPU"] = "1"
    p = start(env, device="cpu")
    try:
        r = report(p)
    finally:
        finish(p)
    assert r["claim"]["source"] == "lock" and r["cvd"] in ("3", "5")


def e1_measure(env: dict, device: str) -> subprocess.CompletedProcess:
    """`e1 measure` of a valid spec on `device`; the GPU claim comes before anything else."""
    spec = Path(env["SPEC_DIR"]) / "measure-spec.json"
    spec.write_text(json.dumps({
        "id": "x", "model": "molmoe-1b-tiny", "device": device, "dtype": "float32", "weights": "random", "seed": 0,
        "variant": VARIANT, "knobs": {}, "image": "336x336", "image_path": "/nonexistent/x.png", "prompt": "short",
        "prompt_path": "/nonexistent/p.json", "decode_tokens": 2, "warmup": 3, "timed": 10,
        "energy": {"repeats": 3, "min_periods": 10}}))
    return subprocess.run([sys.executable, "-m", "e1", "measure", "--spec", str(spec), "--out-parquet",
                           "/nonexistent/x.parquet", "--out-json", "/nonexistent/x.json"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_job_fails_clearly_when_no_gpu_frees_in_time(env):
    a, b = start(env), start(env)
    try:
        report(a), report(b)
        env["E1_GPU_WAIT_S"] = "1.5"
        t0 = time.monotonic()
        p = e1_measure(env, "cuda")
        assert 1.5 <= time.monotonic() - t0 < 30
    finally:
        finish(a, b)
    assert p.returncode == 2, p.stderr
    assert "e1 measure: error: no GPU became free within 1.5 s: all 2 candidates stay claimed" in p.stderr
    assert f"pid {a.pid}" in p.stderr and f"pid {b.pid}" in p.stderr and "E1_GPU_WAIT_S" in p.stderr


def test_an_unusable_lock_dir_fails_clearly(env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env["E1_GPU_LOCK_DIR"] = str(blocker / "locks")
    p = e1_measure(env, "cuda")
    assert p.returncode == 2
    assert f"e1 measure: error: cannot create the GPU lock directory '{blocker / 'locks'}'" in p.stderr, p.stderr
    assert "E1_GPU_LOCK_DIR" in p.stderr


@pytest.mark.parametrize("environ, message", [
    ({"CUDA_VISIBLE_DEVICES": " , "}, "CUDA_VISIBLE_DEVICES is set but names no GPU (' , ')"),
    ({"CUDA_VISIBLE_DEVICES": "3,5", "E1_GPU_WAIT_S": "soon"}, "E1_GPU_WAIT_S='soon' is not a number of seconds"),
    ({"CUDA_VISIBLE_DEVICES": "3,5", "E1_GPU_WAIT_S": "-1"}, "E1_GPU_WAIT_S='-1' is not a number of seconds"),
])
def test_bad_environment_is_named(environ, message, tmp_path):
    environ["E1_GPU_LOCK_DIR"] = str(tmp_path / "locks")
    with pytest.raises(gpus.ClaimError) as e:
        gpus.claim(environ)
    assert message in str(e.value)
    assert gpus.current() is None


def test_no_nvidia_smi_and_no_visible_devices_is_named():
    with pytest.raises(gpus.ClaimError, match="cannot enumerate the GPUs: nvidia-smi is not on PATH"):
        gpus.candidates({}, None)
    assert [g.id for g in gpus.candidates({"CUDA_VISIBLE_DEVICES": "3, GPU-ab"}, None)] == ["3", "GPU-ab"]


# --- through snakemake: two CPU measure jobs at once, the claim forced by the test hook ---------------
# The CPU rehearsal of benchmarks/device_multigpu.sh. CPU measure jobs take every core, so they run one at a
# time; `--set-threads measure=1` lets two run at once on 2 cores ("concurrent"), the default keeps them
# apart ("alone"). E1_GPU_CLAIM_ON_CPU=1 makes the CPU jobs claim one of the fake ids 3 and 5.

VARIANT = "sdpa.auto.eager.k2.c12.learned"  # the tiny model's defaults
DECODE = (24, 25)  # long enough that the timed runs of two jobs started together overlap on 2 cores
MEASURED = [f"results/molmoe-1b-tiny_cpu_float32/measure/336x336__short__n{n}__{VARIANT}.json" for n in DECODE]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multigpu")
    grid = ["--configfile", str(REPO / "tests" / "small_grid.yaml"), "--config", "images=[336x336]",
            "select_prompts=[short]", f"decode_tokens=[{DECODE[0]},{DECODE[1]}]",
            "protocol={warmup: 3, timed: 20, batch_size: 1}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "E1_GPU_", "CUDA_"))}
    env.update(CUDA_VISIBLE_DEVICES="3,5", E1_GPU_LOCK_DIR=str(base / "locks"), E1_GPU_CLAIM_ON_CPU="1",
               PATH=f"{fake_smi(base, SMI_FAILS)}:{env['PATH']}",
               PYTHONPATH=f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}")
    dirs = {}
    for mode, extra in (("concurrent", ["--set-threads", "measure=1", "--resources", "gpu=2"]),
                        ("alone", ["--resources", "gpu=1"])):
        work = base / mode
        work.mkdir()
        p = subprocess.run([sys.executable, "-m", "snakemake", *MEASURED, "--snakefile", str(REPO / "Snakefile"),
                            "--directory", str(work), "--cores", "2", *extra, *grid],
                           cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        dirs[mode] = work
    return dirs


def metas(work: Path) -> list[dict]:
    return [json.loads((work / t).read_text())["meta"] for t in MEASURED]


@pytest.mark.slow
def test_two_concurrent_measure_jobs_record_distinct_claims(two_runs):
    ms = metas(two_runs["concurrent"])
    claims = [m["env"]["gpu_claim"] for m in ms]
    assert sorted(c["id"] for c in claims) == ["3", "5"], claims
    assert all(c["source"] == "lock" and c["candidates"] == ["3", "5"] for c in claims)
    w = [m["wall_clock"] for m in ms]
    for x in w:
        assert x["start"] <= x["runs_start"] <= x["runs_end"] <= x["end"]
    assert max(x["start"] for x in w) < min(x["end"] for x in w)  # the two jobs ran at the same time
    w = [m["wall_clock"] for m in metas(two_runs["alone"])]
    assert min(x["end"] for x in w) <= max(x["start"] for x in w)  # one at a time


@pytest.mark.slow
def test_compare_script_reports_claims_overlap_and_medians(two_runs, tmp_path):
    out = tmp_path / "compare.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks/multigpu_compare.py"), str(two_runs["concurrent"]),
                        str(two_runs["alone"]), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    conc, alone = r["concurrent"], r["alone"]
    assert conc["distinct_gpus"] is True
    assert sorted(j["gpu_index"] for j in conc["jobs"]) == ["3", "5"]
    [(_a, _b, ov)] = conc["runs_overlap_s"]
    [(_a, _b, ov_alone)] = alone["runs_overlap_s"]
    assert ov > 0 and ov_alone == 0
    for j in (*conc["jobs"], *alone["jobs"]):
        summary = json.loads((two_runs["concurrent" if j in conc["jobs"] else "alone"] /
                              f"results/molmoe-1b-tiny_cpu_float32/measure/{j['id']}.json").read_text())
        assert j["median_ms"]["decode"] == summary["stages"]["decode"]["median_ms"]
    for cid, ratios in r["median_ratio_concurrent_over_alone"].items():
        c = {j["id"]: j for j in conc["jobs"]}[cid]["median_ms"]["e2e"]
        a = {j["id"]: j for j in alone["jobs"]}[cid]["median_ms"]["e2e"]
        assert ratios["e2e"] == pytest.approx(c / a)
    assert "== concurrent: 2 jobs, distinct GPUs: True" in p.stdout
    assert f"runs of 336x336__short__n{DECODE[0]}__{VARIANT} and 336x336__short__n{DECODE[1]}__{VARIANT} overlap" in p.stdout


def test_compare_script_reads_the_sampling_log(tmp_path):
    log = tmp_path / "apps.log"
    log.write_text("t 1.0\n\nt 2.0\n11, 00000000:19:00.0\n12, 00000000:3B:00.0\n"
                   "t 3.0\n11, 00000000:19:00.0\n12, 00000000:19:00.0\n")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from multigpu_compare import apps_samples
    finally:
        sys.path.pop(0)
    a = apps_samples(log)
    assert (a["samples"], a["samples_with_processes"], a["samples_with_two_gpus_busy"],
            a["samples_with_a_gpu_shared"]) == (3, 2, 1, 1)
    assert a["shared_examples"] == [{"00000000:19:00.0": ["11", "12"]}]
