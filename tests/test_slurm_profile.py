"""profiles/slurm as snakemake reads it together with profiles/default, planned from a machine without a GPU.

Dry runs only (about 3 s each); the real cluster run is tests/slurm/run_slurm_test.sh (CI runs it after
pytest). Needs the [slurm] extra (snakemake-executor-plugin-slurm).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")

REPO = Path(__file__).resolve().parents[1]
SMALL_GRID = REPO / "tests" / "small_grid.yaml"
GPU_RULES = ("measure", "profile", "calibrate", "flop_check", "fidelity")


def dry_run(workdir: Path, device: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/slurm", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(SMALL_GRID), "--config", f"device={device}",
           "images=[336x336]", "select_prompts=[short]"]
    p = subprocess.run(cmd, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                       text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    return out


def job_resources(out: str) -> dict[str, list[str]]:
    """{rule: [resources line of each of its jobs]} from a dry run's job blocks."""
    res: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n)", out):
        m = re.search(r"^rule (\w+):", block, re.M)
        r = re.search(r"^\s+resources: (.*)$", block, re.M)
        if m and r:
            res.setdefault(m.group(1), []).append(r.group(1))
    return res


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_profile_resources(tmp_path, device):
    """One GPU (gres) per measure/profile job, gpu=0 so the plugin adds no --gpus; CPU rules small;
    the same request whether the head node planned for cuda (--config device=cuda) or for cpu."""
    out = dry_run(tmp_path, device)
    assert "workflow specific profile profiles/default" in out  # loaded with it, as for a user
    res = job_resources(out)
    assert {*GPU_RULES, "stage_latency", "findings"} <= set(res), sorted(res)
    for rule, lines in res.items():
        for line in lines:
            fields = dict(f.split("=", 1) for f in line.split(", "))
            if rule in GPU_RULES:
                assert fields.get("gres") == "gpu:1" and fields.get("gpu") == "0", (rule, line)
                assert fields["mem_mb"] == "16000" and fields["runtime"] == "60", (rule, line)
            else:
                assert "gres" not in fields and int(fields["mem_mb"]) <= 8000, (rule, line)
                assert fields.get("gpu", "0") == "0", (rule, line)  # no --gpus for a CPU rule
    if device == "cuda":  # the full model, planned on a machine without a GPU
        assert "results/molmoe-1b_cuda_bfloat16/measure/" in out and "molmoe-1b-tiny" not in out


def test_gpu_resource_is_scoped_local():
    """profiles/default's `resources: gpu=1` wins over any `resources` here (workflow profile); scoped
    local, it is not summed over submitted jobs. The cluster test shows the GPU jobs submitted together."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    default = yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())
    assert "gpu=local" in profile["set-resource-scopes"]
    assert "resources" not in profile  # it would be ignored: profiles/default sets it
    assert profile["set-resources"]["calibrate"] == profile["set-resources"]["measure"]
    assert profile["set-resources"]["flop_check"] == profile["set-resources"]["measure"]
    assert profile["set-resources"]["fidelity"] == profile["set-resources"]["measure"]
    assert {"keep-going", "rerun-incomplete"} <= {k for k, v in profile.items() if v is True}
    assert "gpu=1" in default["resources"]
