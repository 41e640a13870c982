"""The Snakemake workflow end to end on the CPU: a small grid, no-op reruns, incremental reruns, schema errors.

The rules find the package's modules through REPO = Path(workflow.basedir), i.e. the directory of the
Snakefile. A copied Snakefile would look for src/e1/*.py next to the copy (MissingInputException), so the
tests run the repository's own Snakefile with `--directory <tmp>` and a small test config passed with
`--configfile`: all outputs (inputs/, results/, figures/, logs/, .snakemake/) land in the tmp dir.

One real run of the small grid (tests/small_grid.yaml: 8 measurement and 8 profile jobs, 1 calibration, 2 flop
checks, the FLOPs/scaling/findings outputs) took 113 s on 2 CPU cores; everything else is dry runs (about 3 s
each). Marked slow: `python -m pytest -m "not slow"` leaves these out. Module mtimes are bumped with os.utime and restored afterwards;
file contents in the repository are never changed (see MTIME_ONLY for how a bump stands for an edit).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
TARGET = "figures/e1_stage_stack_plot.png"
BREAKDOWN_FIGURE = "figures/e1_attention_ffn_breakdown.png"
RUN = "molmoe-1b-tiny_cpu_float32"
LATENCY = "results/e1_stage_latency_breakdown.json"
FLOPS_FIGURE = "figures/e1_flops_vs_latency.png"
SCALING_FIGURE = "figures/e1_scaling_curves.png"
FLOPS_JSON = "results/e1_flops_vs_latency.json"
ROUTING_FIGURE = "figures/e1_expert_load.png"
ENERGY_JSON = "results/e1_stage_energy.json"
ENERGY_FIGURE = "figures/e1_stage_energy_plot.png"
# what every change to the stage latency breakdown reruns downstream of it (besides the stack plot)
AFTER_LATENCY = {"plot_routing": 1, "stage_energy": 1, "plot_energy": 1, "flops_vs_latency": 1, "plot_flops": 1,
                 "plot_scaling": 1, "findings": 1, "cross_model": 1, "plot_cross_model": 1}
# ... when no configuration of the cross-model regime (short prompt, N=4) changes
AFTER_LATENCY_NOT_CROSS = {k: n for k, n in AFTER_LATENCY.items() if k not in ("cross_model", "plot_cross_model")}

SMALL_GRID = Path(__file__).resolve().parent / "small_grid.yaml"
TEST_CONFIG = yaml.safe_load(SMALL_GRID.read_text())
VARIANT = "sdpa.auto.eager.k2.c12.learned"  # the defaults spelled out (tiny model: top-2 of 8 experts)
CONFIG_IDS = [f"{i}__{p}__n{n}__{VARIANT}" for i in TEST_CONFIG["images"] for p in TEST_CONFIG["prompts"]
              for n in TEST_CONFIG["decode_tokens"]]
STAGE_KEYS = ("vision_encoder", "projector", "prefill", "decode", "e2e", "unattributed")
STAT_KEYS = ("mean_ms", "median_ms", "p95_ms", "p99_ms", "std_ms", "n")
# Every package file: a rule's code inputs follow its imports (code() in workflow/rules/common.smk).
WATCHED = sorted(p for p in (REPO / "src" / "e1").rglob("*") if p.suffix in (".py", ".json"))


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: float = 600):
    """Run the repository's Snakefile in `workdir`; returns (returncode, combined output, seconds)."""
    # targets first: --configfile takes several values and would swallow targets placed after it
    cmd = [sys.executable, "-m", "snakemake", *args, "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
           "--cores", "2", "--configfile", str(configfile or workdir / "config.yaml")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table snakemake prints ({} when there is nothing to do)."""
    m = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal\s+(\d+)", output, re.S)
    if m is None:
        return {}
    counts = {}
    for line in m.group(1).splitlines():
        name, n = line.split()
        counts[name] = int(n)
    assert sum(counts.values()) == int(m.group(2)), output
    return counts


def measure_wildcards(output: str) -> list[str]:
    """Config ids of the measure jobs a dry run lists."""
    blocks = re.split(r"\n(?=\S*rule \w+:)", output)
    return sorted(f"{i}__{p}__n{n}__{v}" for b in blocks if re.match(r"\S*rule measure:", b.strip())
                  for i, p, n, v in re.findall(r"wildcards: (?:run=\S+, )?image=(\S+), prompt=(\S+), decode=(\d+), variant=(\S+)", b))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def bumped_mtime(path: Path):
    """Make `path` look newer than every output; restore its mtime afterwards (contents untouched).

    The mtime is restored only if nobody else changed the file meanwhile (another agent may be editing
    package files): then its new mtime is what makes snakemake rerun, and must stay.
    """
    st = path.stat()
    before = digest(path)
    new_ns = time.time_ns() + 5_000_000_000  # clearly newer than outputs written moments ago
    os.utime(path, ns=(st.st_atime_ns, new_ns))
    try:
        yield
    finally:
        if path.stat().st_mtime_ns == new_ns and digest(path) == before:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    """The small grid, built once: workdir, the output of the run, its duration, watched mtimes."""
    work = tmp_path_factory.mktemp("e1_workflow")
    config = write_config(work / "config.yaml", TEST_CONFIG)
    mtimes = {p: p.stat().st_mtime_ns for p in WATCHED}
    rc, out, secs = snakemake(work, configfile=config)  # the default target: both figures
    print(f"\nfull run of the small grid: {secs:.1f} s")
    return {"dir": work, "config": config, "rc": rc, "out": out, "secs": secs, "mtimes": mtimes}


@pytest.fixture(scope="module")
def breakdown(wf):
    assert wf["rc"] == 0, wf["out"][-6000:]
    return json.loads((wf["dir"] / LATENCY).read_text())


def assert_package_unchanged(wf):
    """Dry-run expectations assume nobody edited package files since the build."""
    changed = [str(p) for p, ns in wf["mtimes"].items() if p.stat().st_mtime_ns != ns]
    assert not changed, f"package files were modified while the workflow test ran: {changed}"


# --- the full run ------------------------------------------------------------------------------------

def test_run_succeeds(wf):
    assert wf["rc"] == 0, wf["out"][-6000:]
    counts = job_counts(wf["out"])
    # spec: one file per measure (8), profile (8), flop_check (2), fidelity (2) and calibrate (1) job
    assert counts == {"image": 2, "prompt": 2, "spec": 21, "measure": 8, "fidelity": 2, "stage_latency": 1,
                      "plot_stack": 1, "profile": 8,
                      "parse_trace": 8, "breakdown": 1, "plot_breakdown": 1, "calibrate": 1, "flop_check": 2,
                      **AFTER_LATENCY, "all": 1}, wf["out"][-3000:]
    assert (wf["dir"] / LATENCY).is_file()


def test_breakdown_configs(breakdown):
    configs = breakdown["configs"]
    assert set(breakdown) == {"meta", "configs"}
    assert len(configs) == 8
    assert sorted(c["id"] for c in configs) == sorted(CONFIG_IDS)
    for c in configs:
        n_new = c["decode_tokens"]
        assert c["id"] == f"{c['image']}__{c['prompt']}__n{n_new}__{c['variant']}"
        assert c["knobs"] == {"attn_implementation": "sdpa", "experts_implementation": "auto",
                              "backend": "eager", "moe_top_k": 2, "max_crops": 12, "moe_routing": "learned"}
        assert c["decode_steps"] == n_new - 1
        for s in STAGE_KEYS:
            st = c["stages"][s]
            for k in STAT_KEYS:
                assert k in st, (c["id"], s, k)
            assert st["n"] == 10, (c["id"], s)
            assert st["mean_ms"] >= 0 and st["median_ms"] >= 0 and st["std_ms"] >= 0
            assert st["p95_ms"] <= st["p99_ms"] + 1e-9
        assert c["stages"]["unattributed"]["min_ms"] >= 0  # CPU: host marks lie inside the host e2e
        assert c["decode_step"]["n"] == 10 * (n_new - 1), c["id"]
        for k in STAT_KEYS:
            assert k in c["decode_step"]
        assert c["tokens_identical_across_runs"] is True
        assert c["prompt_tokens"] == TEST_CONFIG["prompts"][c["prompt"]]["tokens"]


def test_breakdown_meta(breakdown):
    meta = breakdown["meta"]
    assert meta["model"] == "molmoe-1b-tiny"
    assert meta["device_type"] == "cpu"
    assert meta["dtype"] == "float32"
    assert "N-1 decode steps" in meta["convention"]
    assert meta["protocol"] == {"warmup": 3, "timed": 10, "batch_size": 1}
    assert meta["weights"] == "random" and meta["seed"] == 0
    assert len(meta["build_s"]) == 8


@pytest.mark.parametrize("figure", [TARGET, BREAKDOWN_FIGURE, FLOPS_FIGURE, SCALING_FIGURE, ROUTING_FIGURE])
def test_figure_written(wf, breakdown, figure):
    png = wf["dir"] / figure
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a real multi-bar chart, not an empty canvas
    from PIL import Image

    with Image.open(png) as im:
        assert im.width >= 400 and im.height >= 300
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 10


def test_flops_vs_latency_json(wf, breakdown):
    data = json.loads((wf["dir"] / FLOPS_JSON).read_text())
    cal = data["meta"]["calibration"]
    assert cal["device_type"] == "cpu" and cal["dtype"] == "float32"
    assert cal["matmul_tflops"] > 0 and cal["copy_gbps"] > 0
    assert len(data["points"]) == 4 * len(CONFIG_IDS)  # every configuration has decode steps (N >= 2)
    for p in data["points"]:
        row = next(c for c in breakdown["configs"] if c["id"] == p["id"])
        assert p["measured_ms"] == row["stages"][p["stage"]]["median_ms"]
        assert p["flops"] > 0 and p["bytes"] > 0 and p["roofline_ms"] > 0
    for fit in data["fits"].values():
        assert fit["n"] == len(data["points"]) and -1 <= fit["spearman_rho"] <= 1
    assert data["equal_flops_spread"] == []
    checks = data["flop_check"]
    assert sorted(c["image"] for c in checks) == sorted(TEST_CONFIG["images"])
    for c in checks:
        assert c["prompt"] == "short"
        assert "aten._grouped_mm" not in c["zero_counted_ops"]  # the default experts path, counted by e1's formula
        assert c["zero_counted_ops"] == ["aten._scaled_dot_product_flash_attention_for_cpu"]
        assert c["stages"]["projector"]["counted"] > 0


def test_findings_written(wf, breakdown):
    md = (wf["dir"] / "results/e1_findings.md").read_text()
    result = json.loads((wf["dir"] / "results/e1_findings.json").read_text())
    assert "scaled-down stand-in" in md and "molmoe-1b-tiny" in md and "float32" in md
    assert len(result["expected_findings"]) == 5 and md.count("Criterion:") == 5
    for f in result["expected_findings"]:
        assert f["verdict"] in ("holds", "does not hold", "mixed", "not measured")
    assert set(result["questions"]) == {"q1_dominant_stage", "q2_llm_components", "q3_regimes", "q4_flops",
                                        "q5_energy"}
    assert result["questions"]["q5_energy"] == {"measured": False, "text": "not measured (device 'cpu' has no "
                                                "energy counter (NVIDIA GPUs only))"}
    assert "## Expert load" in md and "learned routing, prefill: busiest expert / mean" in md


def test_routing_and_energy_on_the_cpu(wf, breakdown):
    """Every summary has its expert load (counts sum to tokens x top-k), the GPU state and energy say 'not
    measured' on the CPU with the reason, and the energy table and figure exist without a number."""
    top_k = 2
    for c in breakdown["configs"]:
        r = c["routing"]
        assert r["mode"] == "learned" and c["knobs"]["moe_routing"] == "learned"
        assert all(sum(layer) == c["counts"]["prefill_tokens"] * top_k for layer in r["prefill"]["counts"])
        assert all(sum(layer) == (c["decode_tokens"] - 1) * top_k for layer in r["decode"]["counts"])
        assert c["gpu_state"]["measured"] is False and c["energy"]["measured"] is False
    energy = json.loads((wf["dir"] / ENERGY_JSON).read_text())
    assert energy["meta"]["measured"] is False and "no energy counter" in energy["meta"]["reason"]
    assert all(not r["measured"] and "stages" not in r for r in energy["configs"])
    assert (wf["dir"] / ENERGY_FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fvl = json.loads((wf["dir"] / FLOPS_JSON).read_text())
    assert all(p["energy"]["measured"] is False for p in fvl["points"])


def test_parquet_rows_match_summaries(wf, breakdown):
    for c in breakdown["configs"]:
        n_new = c["decode_tokens"]
        df = pd.read_parquet(wf["dir"] / f"results/{RUN}/measure/{c['id']}.parquet")
        assert list(df.columns) == ["config_id", "run", "stage", "step", "ms"]
        assert (df.config_id == c["id"]).all()
        assert sorted(df.run.unique()) == list(range(10))
        assert len(df) == 10 * (1 + 4 + 2 + (n_new - 1))
        for run, g in df.groupby("run"):
            assert len(g) == 1 + 4 + 2 + (n_new - 1)
            steps = g[g.stage == "decode_step"]
            assert sorted(steps.step) == list(range(1, n_new))
            assert (g[g.stage != "decode_step"].step == -1).all()
            ms = g[g.stage != "decode_step"].set_index("stage").ms
            four = ms[["vision_encoder", "projector", "prefill", "decode"]].sum()
            assert ms["unattributed"] == pytest.approx(ms["e2e"] - four, abs=1e-6)
            assert ms["decode"] == pytest.approx(steps.ms.sum(), abs=1e-6)
        assert (df.ms >= 0).all()
        for s in ("preprocess", *STAGE_KEYS):
            v = df[df.stage == s].ms
            assert c["stages"][s]["mean_ms"] == pytest.approx(v.mean(), rel=1e-12), (c["id"], s)
            assert c["stages"][s]["median_ms"] == pytest.approx(v.median(), rel=1e-12), (c["id"], s)
            assert c["stages"][s]["n"] == len(v)
        steps = df[df.stage == "decode_step"].ms
        assert c["decode_step"]["mean_ms"] == pytest.approx(steps.mean(), rel=1e-12)
        assert c["decode_step"]["n"] == len(steps)
        summary = json.loads((wf["dir"] / f"results/{RUN}/measure/{c['id']}.json").read_text())
        assert summary["stages"] == c["stages"]


# --- nothing to do -----------------------------------------------------------------------------------

def test_second_run_does_nothing(wf, breakdown):
    assert_package_unchanged(wf)
    outputs = [wf["dir"] / TARGET, wf["dir"] / LATENCY,
               *(wf["dir"] / f"results/{RUN}/measure/{cid}.parquet" for cid in CONFIG_IDS)]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    for target in ([TARGET], []):  # the figure, and the default target (rule all)
        rc, out, secs = snakemake(wf["dir"], "-n", *target)
        print(f"\nno-op dry run {target or '(all)'}: {secs:.1f} s")
        assert rc == 0, out[-3000:]
        assert "Nothing to be done" in out, out[-3000:]
        assert job_counts(out) == {}
    rc, out, secs = snakemake(wf["dir"], TARGET)  # a real second run
    print(f"no-op real run: {secs:.1f} s")
    assert rc == 0, out[-3000:]
    assert "Nothing to be done" in out, out[-3000:]
    assert {p: p.stat().st_mtime_ns for p in outputs} == before


# --- incremental reruns (dry runs) -------------------------------------------------------------------
# Snakemake 9 does not rerun a job whose input is newer than its outputs when that input (< 1 MB) still
# has the checksum recorded when the job ran: touching a file without editing it changes nothing.
# `--max-checksum-file-size 0` turns that comparison off, so a bumped mtime stands for an edit and shows
# which rules each module feeds (a real edit changes the checksum and reruns the same jobs).
MTIME_ONLY = ("--max-checksum-file-size", "0")


def test_touch_without_edit_reruns_nothing(wf, breakdown):
    assert_package_unchanged(wf)
    with bumped_mtime(REPO / "src/e1/latency/timing.py"):
        rc, out, _ = snakemake(wf["dir"], "-n")
    assert rc == 0, out[-3000:]
    assert "Nothing to be done" in out, out[-3000:]


def test_touch_plot_module_reruns_only_the_plot(wf, breakdown):
    assert_package_unchanged(wf)
    with bumped_mtime(REPO / "src/e1/plots/stack.py"):
        rc, out, _ = snakemake(wf["dir"], "-n", *MTIME_ONLY)
    assert rc == 0, out[-3000:]
    assert job_counts(out) == {"plot_stack": 1, "all": 1}, out[-3000:]


@pytest.mark.parametrize("module, jobs", [
    ("plots/scaling.py", {"plot_scaling": 1}),
    ("findings.py", {"findings": 1}),
    # the cross-model table computes each stage's analytic FLOPs
    ("roofline/flops.py", {"flop_check": 2, "flops_vs_latency": 1, "plot_flops": 1, "findings": 1, "cross_model": 1,
                           "plot_cross_model": 1}),
    # imported by other modules only: the rules' code inputs follow the imports
    ("roofline/correlation.py", {"flops_vs_latency": 1, "plot_flops": 1, "findings": 1}),
    ("plots/common.py", {"plot_stack": 1, "plot_routing": 1, "plot_energy": 1, "plot_breakdown": 1, "plot_flops": 1,
                         "plot_scaling": 1, "plot_cross_model": 1}),
])
def test_touch_flops_modules_reruns_only_their_jobs(wf, breakdown, module, jobs):
    assert_package_unchanged(wf)
    with bumped_mtime(REPO / "src/e1" / module):
        rc, out, _ = snakemake(wf["dir"], "-n", *MTIME_ONLY)
    assert rc == 0, out[-3000:]
    assert job_counts(out) == {**jobs, "all": 1}, out[-3000:]


def test_touch_timing_module_reruns_all_measurements(wf, breakdown):
    assert_package_unchanged(wf)
    with bumped_mtime(REPO / "src/e1/latency/timing.py"):
        rc, out, _ = snakemake(wf["dir"], "-n", *MTIME_ONLY)
    assert rc == 0, out[-3000:]
    # the flop check runs the stage calls untimed: it does not depend on the timing core
    assert job_counts(out) == {"measure": 8, "stage_latency": 1, "plot_stack": 1, "profile": 8, "parse_trace": 8,
                               "breakdown": 1, "plot_breakdown": 1, **AFTER_LATENCY, "all": 1}, out[-3000:]
    assert measure_wildcards(out) == sorted(CONFIG_IDS)


def test_touch_table_module_reruns_what_reads_measure_summaries(wf, breakdown):
    """e1/latency/table.py writes the table and holds the checked readers of measure summaries and of the
    table: the breakdown (which reads summaries) and everything after the table rerun, no measurement."""
    assert_package_unchanged(wf)
    with bumped_mtime(REPO / "src/e1/latency/table.py"):
        rc, out, _ = snakemake(wf["dir"], "-n", *MTIME_ONLY)
    assert rc == 0, out[-3000:]
    assert job_counts(out) == {"stage_latency": 1, "plot_stack": 1, "parse_trace": 8, "breakdown": 1,
                               "plot_breakdown": 1, **AFTER_LATENCY, "all": 1}, out[-3000:]


def test_touch_measure_module_reruns_only_measurements(wf, breakdown):
    """The jobs' shared runtime is e1/jobs/, not the measure job: editing latency/measure.py reruns the measure
    jobs and what follows them, no profile or flop-check job."""
    assert_package_unchanged(wf)
    with bumped_mtime(REPO / "src/e1/latency/measure.py"):
        rc, out, _ = snakemake(wf["dir"], "-n", *MTIME_ONLY)
    assert rc == 0, out[-3000:]
    assert job_counts(out) == {"measure": 8, "stage_latency": 1, "plot_stack": 1, "breakdown": 1, "plot_breakdown": 1,
                               **AFTER_LATENCY, "all": 1}, out[-3000:]


def test_changing_one_prompt_reruns_only_its_jobs(wf, breakdown):
    assert_package_unchanged(wf)
    cfg = copy.deepcopy(TEST_CONFIG)
    cfg["prompts"]["long"]["tokens"] = 121
    path = write_config(wf["dir"] / "config_long121.yaml", cfg)
    rc, out, _ = snakemake(wf["dir"], "-n", configfile=path)
    assert rc == 0, out[-3000:]
    # the flop check runs with the first prompt (short) only; the cross-model study too
    assert job_counts(out) == {"prompt": 1, "measure": 4, "stage_latency": 1, "plot_stack": 1, "profile": 4,
                               "parse_trace": 4, "breakdown": 1, "plot_breakdown": 1, **AFTER_LATENCY_NOT_CROSS,
                               "all": 1}, out[-3000:]
    assert "output: inputs/prompts/molmoe-1b-tiny/long.json" in out and "output: inputs/prompts/molmoe-1b-tiny/short.json" not in out
    assert out.count("reason: Params have changed since last execution") == 1, out[-3000:]  # the prompt job
    assert measure_wildcards(out) == sorted(cid for cid in CONFIG_IDS if "__long__" in cid)


def test_changing_timed_runs_reruns_all_measurements(wf, breakdown):
    assert_package_unchanged(wf)
    cfg = copy.deepcopy(TEST_CONFIG)
    cfg["protocol"]["timed"] = 11
    path = write_config(wf["dir"] / "config_timed11.yaml", cfg)
    rc, out, _ = snakemake(wf["dir"], "-n", configfile=path)
    assert rc == 0, out[-3000:]
    # the profile jobs do not depend on the timed-run count; the breakdown compares against the timed runs
    assert job_counts(out) == {"spec": 8, "measure": 8, "stage_latency": 1, "plot_stack": 1, "breakdown": 1,
                               "plot_breakdown": 1, **AFTER_LATENCY, "all": 1}, out[-3000:]
    assert measure_wildcards(out) == sorted(CONFIG_IDS)
    assert out.count("reason: Params have changed since last execution") == 8, out[-3000:]  # the measure specs


def test_dry_runs_left_the_workdir_up_to_date(wf, breakdown):
    """After the dry runs (and mtime restores), the original config still has nothing to do."""
    assert_package_unchanged(wf)
    rc, out, _ = snakemake(wf["dir"], "-n")
    assert rc == 0 and "Nothing to be done" in out, out[-3000:]


# --- schema errors -----------------------------------------------------------------------------------

def _bad(update) -> dict:
    cfg = copy.deepcopy(TEST_CONFIG)
    update(cfg)
    return cfg


BAD_CONFIGS = {
    # name: (config, texts the error must contain)
    "warmup-7": (_bad(lambda c: c["protocol"].update(warmup=7)),
                 ["7 is greater than the maximum of 5", "['protocol']['warmup']"]),
    "timed-5": (_bad(lambda c: c["protocol"].update(timed=5)),
                ["5 is less than the minimum of 10", "['protocol']['timed']"]),
    "image-336": (_bad(lambda c: c.update(images=["336"])),
                  ["'336' does not match", "WIDTHxHEIGHT", "['images']"]),
    "decode-0": (_bad(lambda c: c.update(decode_tokens=[0])),
                 ["0 is less than the minimum of 1", "['decode_tokens']"]),
    "model-gpt2": (_bad(lambda c: c.update(model="gpt2")),
                   ["'gpt2' is not one of ['auto', 'molmoe-1b', 'molmoe-1b-tiny', 'llava-1.5-7b',", "['model']"]),
    "backend-graph": (_bad(lambda c: c.update(backend="graph")),
                      ["config: backend 'graph'; allowed: eager, cuda_graph"]),
    "top-k-text": (_bad(lambda c: c.update(moe_top_k="eight")),
                   ["config: moe_top_k 'eight'; allowed: null (the model's own) or an integer from 1 to 8"]),
    # bounded in the schema: the description says why
    "image-99999": (_bad(lambda c: c.update(images=["99999x99999"])),
                    ["'99999x99999' does not match", "each side 1..8192 px", "99999x99999 would need ~400 GB"]),
    "unknown-key": (_bad(lambda c: c.update(unknown_knob=1)),
                    ["Additional properties are not allowed ('unknown_knob' was unexpected)",
                     "'additionalProperties': False", "'properties': {'model'"]),
}


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e1_schema")


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_schema_rejects_bad_config(empty_dir, name):
    cfg, texts = BAD_CONFIGS[name]
    work = empty_dir / name
    work.mkdir()
    path = write_config(work / "bad.yaml", cfg)
    rc, out, _ = snakemake(work, "-n", configfile=path)
    assert rc != 0, out[-3000:]
    assert ("Error validating config file" in out) == (not texts[0].startswith("config:")), out[-3000:]
    for t in texts:
        assert t in out, f"{t!r} not in:\n{out[-3000:]}"
    assert "Building DAG of jobs" not in out  # failed while parsing, before planning any job
    assert not any((work / d).exists() for d in ("inputs", "results", "figures", "logs"))


# --- planning for a GPU from a machine without one (cluster head node) --------------------------------

def test_gpu_plan_on_a_cpu_machine(empty_dir):
    """device: cuda on a GPU-less machine plans the full model's GPU jobs (it does not run them here)."""
    work = empty_dir / "gpu-plan"
    work.mkdir()
    cfg = copy.deepcopy(TEST_CONFIG) | {"device": "cuda"}
    path = write_config(work / "config.yaml", cfg)
    rc, out, _ = snakemake(work, "-n", configfile=path)
    assert rc == 0, out[-3000:]
    counts = job_counts(out)
    assert counts["measure"] == 8 and counts["profile"] == 8, out[-3000:]
    assert counts["calibrate"] == 1 and counts["flop_check"] == 2, out[-3000:]
    assert "results/molmoe-1b_cuda_bfloat16/calibrate.json" in out
    assert "results/molmoe-1b_cuda_bfloat16/measure/" in out  # model auto -> molmoe-1b, dtype auto -> bf16
    assert "molmoe-1b-tiny" not in out
    assert counts["fidelity"] == 2, out[-3000:]
    assert out.count("gpu=1") == 21  # every measure, profile, calibrate, flop_check and fidelity job asks for one GPU


# --- sweep axes (issue 7): variants in the plan -----------------------------------------------------------

def plan(work: Path, **overrides) -> tuple[int, str]:
    work.mkdir()
    path = write_config(work / "config.yaml", copy.deepcopy(TEST_CONFIG) | overrides)
    rc, out, _ = snakemake(work, "-n", configfile=path)
    return rc, out


def test_sweep_axes_multiply_the_grid(empty_dir):
    rc, out = plan(empty_dir / "sweep", moe_top_k=[1, 2], experts_implementation=["grouped_mm", "batched_mm"],
                   max_crops=4)
    assert rc == 0, out[-3000:]
    variants = {cid.split("__")[-1] for cid in measure_wildcards(out)}
    assert variants == {f"sdpa.{e}.eager.k{k}.c4.learned" for e in ("grouped_mm", "batched_mm") for k in (1, 2)}
    assert job_counts(out)["measure"] == 8 * 4
    assert f"results/{RUN}/specs/measure/336x336__short__n2__sdpa.batched_mm.eager.k1.c4.learned.json" in out  # its spec


def test_cuda_graph_variants_are_measured_profiled_and_not_checked_against_generate(empty_dir):
    rc, out = plan(empty_dir / "graph", device="cuda", backend=["eager", "cuda_graph"])
    assert rc == 0, out[-3000:]
    counts = job_counts(out)
    assert counts["measure"] == 16 and counts["profile"] == 16, out[-3000:]
    assert counts["fidelity"] == 2, out[-3000:]  # generate() runs eagerly: eager variants only
    assert counts["flop_check"] == 2, out[-3000:]  # FLOPs are counted on eager decode: one check per image
    assert "sdpa.auto.cuda_graph.k8.c12.learned" in out


def test_impossible_combinations_are_left_out_and_named(empty_dir):
    rc, out = plan(empty_dir / "left-out", device="cuda", backend=["eager", "cuda_graph"],
                   experts_implementation=["grouped_mm", "eager"])
    assert rc == 0, out[-3000:]
    assert "1 variant(s) left out" in out and "sdpa.eager.cuda_graph.k8.c12.learned: backend cuda_graph with " \
        "experts_implementation 'eager' (its loop over the experts hit syncs with the host); allowed: auto, " \
        "grouped_mm, batched_mm" in out, out[-3000:]
    assert job_counts(out)["measure"] == 8 * 3


@pytest.mark.parametrize("overrides,message", [
    ({"backend": "cuda_graph"}, "backend cuda_graph needs device cuda; this run's device is 'cpu'"),
    ({"device": "cuda", "backend": "cuda_graph", "experts_implementation": "eager"},
     "backend cuda_graph with experts_implementation 'eager' (its loop over the experts hit syncs with "
     "the host); allowed: auto, grouped_mm, batched_mm"),
    ({"moe_top_k": 9}, "moe_top_k 9; allowed: null (the model's own) or an integer from 1 to 8 (molmoe-1b-tiny has "
                       "8 experts)"),
])
def test_impossible_variants_fail_while_planning(tmp_path, overrides, message):
    rc, out = plan(tmp_path / "bad", **overrides)
    assert rc != 0 and message in out, out[-3000:]
    assert "rule measure" not in out


# --- the HTML report (snakemake --report) --------------------------------------------------------------

def caption_title(rst: Path) -> str:
    """The bold first phrase of a caption (**...**), as the report renders it."""
    m = re.match(r"\*\*(.+?)\*\*", rst.read_text(), re.S)
    assert m, f"{rst} does not start with a bold title"
    return " ".join(m.group(1).split())


def test_report_has_every_figure_caption_and_the_run_metadata(wf, breakdown):
    """The self-contained report embeds each figure the run made (byte for byte), its caption, the run
    metadata JSON and the configured grid; every figure under figures/ needs workflow/report/<name>.rst."""
    import base64
    import html

    report = wf["dir"] / "report.html"
    rc, out, secs = snakemake(wf["dir"], "--report", str(report))
    print(f"\nreport: {secs:.1f} s")
    assert rc == 0, out[-3000:]
    text = report.read_text()
    flat = " ".join(html.unescape(text).replace("\\n", " ").split())  # captions sit in JSON strings
    figures = sorted((wf["dir"] / "figures").glob("*.png"))
    assert {f.name for f in figures} >= {Path(TARGET).name, Path(BREAKDOWN_FIGURE).name}
    items = [*figures, wf["dir"] / LATENCY]
    captions = {f.name: REPO / "workflow" / "report" / f"{f.stem}.rst" for f in figures}
    captions[Path(LATENCY).name] = REPO / "workflow" / "report" / "run_metadata.rst"
    for item in items:
        m = re.search(rf"filename={re.escape(item.name)};base64,([A-Za-z0-9+/=]+)", text)
        assert m, f"{item.name} is not embedded in the report"
        assert base64.b64decode(m.group(1)) == item.read_bytes(), f"{item.name}: embedded bytes differ"
        rst = captions[item.name]
        assert rst.is_file(), f"{item.name} has no caption file {rst}"
        assert caption_title(rst) in flat, f"caption of {item.name} not in the report"
    # the workflow description, rendered from the run's config
    assert "This run's grid (config.yaml): images 336x336, 560x560" in flat
    assert "short (16 tokens), long (120 tokens)" in flat
    assert "2, 4 new tokens per request" in flat
    meta = json.loads((wf["dir"] / LATENCY).read_text())["meta"]
    assert meta["torch"] and meta["transformers"] and meta["model"] == "molmoe-1b-tiny"
