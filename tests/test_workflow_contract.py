"""The workflow's contract through real snakemake runs (issue 11): each test builds a subset of the small
grid (tests/small_grid.yaml) in its own directory, the way a user would, with --config. Slow (about 2 min).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMALL_GRID = REPO / "tests" / "small_grid.yaml"
RUN = "molmoe-1b-tiny_cpu_float32"
VARIANT = "sdpa.auto.eager.k2.c12.learned"
ONE = ("--config", "images=[336x336]", "select_prompts=[short]", "decode_tokens=[2]")  # one configuration


def snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile", configfile: Path | None = SMALL_GRID,
              env: dict | None = None, timeout: float = 600) -> tuple[int, str]:
    cf = ["--configfile", str(configfile)] if configfile else []
    cmd = [sys.executable, "-m", "snakemake", *args, "--snakefile", str(snakefile), "--directory", str(workdir),
           "--cores", "2", *cf]
    p = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})
    return p.returncode, p.stdout + p.stderr


def test_jobs_run_the_code_of_their_own_checkout(tmp_path):
    """Defect 1: a second checkout's edit runs, although the venv's e1 is the first checkout (editable)."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for part in ("Snakefile", "config.yaml", "src", "workflow", "profiles", "envs"):
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(
            REPO / part, clone / part, **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / part).is_dir() else {}))
    with open(clone / "src/e1/inputs/images.py", "a") as f:  # planning imports this module; only the job calls it
        f.write('\n\ndef write_image(*args, **kwargs):\n    raise SystemExit("BUG")\n')
    work = tmp_path / "work"
    work.mkdir()
    rc, out = snakemake(work, "inputs/images/336x336.png", snakefile=clone / "Snakefile")
    assert rc != 0, out[-3000:]
    assert (work / "logs/inputs/image_336x336.log").read_text().strip().endswith("BUG")
    rc, out = snakemake(work, "inputs/images/336x336.png")  # the first checkout's own Snakefile: its code works
    assert rc == 0, out[-3000:]


def test_report_after_the_quick_start_and_a_lost_json(tmp_path):
    """Defect 2: after building only the stack plot, `snakemake --report` works and names what is not built;
    rule all rebuilds a study JSON that was deleted."""
    rc, out = snakemake(tmp_path, "figures/e1_stage_stack_plot.png", *ONE)
    assert rc == 0, out[-3000:]
    rc, out = snakemake(tmp_path, "--report", "report.html", *ONE)
    assert rc == 0, out[-3000:]
    assert "e1: the report shows what exists; not built yet: figures/e1_expert_load.png, " in out
    assert "results/e1_attention_ffn_breakdown.json" in out
    assert "e1_stage_stack_plot.png" in (tmp_path / "report.html").read_text()
    rc, out = snakemake(tmp_path, *ONE)  # everything
    assert rc == 0, out[-3000:]
    (tmp_path / "results/e1_stage_latency_breakdown.json").unlink()
    rc, out = snakemake(tmp_path, "-n", *ONE)
    assert rc == 0 and "Nothing to be done" not in out, out[-3000:]
    assert "rule stage_latency:" in out and "Missing output files: results/e1_stage_latency_breakdown.json" in out


def _config(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load(SMALL_GRID.read_text()) | changes
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_a_huge_prompt_text_travels_in_files_and_a_text_edit_reruns_nothing(tmp_path):
    """Defect 5: a 140 KB prompt text (before: 'Argument list too long'); editing a prompt's text that does not
    change its tokens (no tokenizer: synthetic ids) reruns nothing."""
    huge = "word " * 28_000
    cfg = _config(tmp_path, images=["336x336"], decode_tokens=[2], prompts={"huge": {"tokens": 16, "text": huge}})
    target = f"results/{RUN}/measure/336x336__huge__n2__{VARIANT}.json"
    rc, out = snakemake(tmp_path, target, configfile=cfg)
    assert rc == 0, out[-3000:]
    cfg = _config(tmp_path, images=["336x336"], decode_tokens=[2], prompts={"huge": {"tokens": 16, "text": "x"}})
    rc, out = snakemake(tmp_path, "-n", target, configfile=cfg)
    assert rc == 0 and "Nothing to be done" in out, out[-3000:]


@pytest.mark.parametrize("changes, message", [
    ({"images": ["1008x784"], "max_crops": 64, "prompts": {"p": {"tokens": 2048}}, "decode_tokens": [2048]},
     "1 configuration(s) exceed the 4096-token context of molmoe-1b-tiny:\n  1008x784__p__n2048__sdpa.auto."
     "eager.k2.c64.learned: 5296 tokens (1 BOS + 1196 image + 2052 text + 2047 decoded)\nreduce images (or max_crops), "
     "prompts.<name>.tokens or decode_tokens"),
    ({"tokenizer": "/nonexistent/tokenizer"}, "tokenizer '/nonexistent/tokenizer': no such directory"),
    ({"select_prompts": ["medium"]}, "select_prompts names ['medium'], which are not in prompts (short, long)"),
])
def test_planning_refuses_what_cannot_run(tmp_path, changes, message):
    """Defect 6: refused while planning, before any job (and before a model is built)."""
    rc, out = snakemake(tmp_path, "-n", configfile=_config(tmp_path, **changes))
    assert rc != 0 and message in out, out[-3000:]
    assert "rule measure" not in out


@pytest.mark.parametrize("content, message", [
    (b"model: auto\ndevice: \xffcpu\n", "config file config.yaml: not UTF-8 text: byte 0xff at line 2, column 9"),
    (b"model: auto\nimages: [336x336\nseed: 0\n", "config file config.yaml: not valid YAML at line 3, column 5"),
])
def test_a_broken_config_yaml_names_file_and_line(tmp_path, content, message):
    (tmp_path / "config.yaml").write_bytes(content)
    rc, out = snakemake(tmp_path, "-n", configfile=None)
    assert rc != 0 and message in out, out[-3000:]


def test_a_subset_of_the_grid_from_the_command_line(tmp_path):
    """Defect 8: --config lists (read as strings by snakemake) and a prompt subset, config.yaml unchanged."""
    rc, out = snakemake(tmp_path, "-n", "--config", "decode_tokens=[16]", "images=[336x336]",
                        "select_prompts=[short]", "moe_top_k=[1,2]")
    assert rc == 0, out[-3000:]
    measured = {b for b in re.split(r"\n(?=\S*rule \w+:)", out) if re.match(r"\S*rule measure:", b.strip())}
    planned = {m for b in measured for m in re.findall(
        r"wildcards: (?:run=\S+, )?image=(\S+), prompt=(\S+), decode=(\d+), variant=(\S+)", b)}
    assert planned == {("336x336", "short", "16", f"sdpa.auto.eager.k{k}.c12.learned") for k in (1, 2)}, planned
    assert len(measured) == 2
    partial = tmp_path / "subset.yaml"
    partial.write_text("select_prompts: [long]\ndecode_tokens: [4]\n")
    rc, out = snakemake(tmp_path, "-n", "--configfile", str(SMALL_GRID), str(partial), configfile=None)
    assert rc == 0, out[-3000:]
    assert out.count("rule measure:") == 2 and "__long__n4__" in out and "__short__" not in out


def test_two_snakemake_runs_in_one_directory_do_not_measure_at_once(tmp_path):
    """Defect 7: CPU measure jobs of two snakemake instances (disjoint targets, one directory) take turns."""
    targets = [f"results/{RUN}/measure/336x336__short__n{n}__{VARIANT}.json" for n in (2, 4)]
    specs = [f"results/{RUN}/specs/measure/336x336__short__n{n}__{VARIANT}.json" for n in (2, 4)]
    rc, out = snakemake(tmp_path, "inputs/images/336x336.png", "inputs/prompts/molmoe-1b-tiny/short.json", *specs)
    assert rc == 0, out[-3000:]
    env = {"E1_CPU_LOCK_DIR": str(tmp_path / "cpu-locks")}
    results: dict[str, tuple[int, str]] = {}
    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, snakemake(tmp_path, t, env=env)))
               for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in targets:
        assert results[t][0] == 0, results[t][1][-3000:]
    walls = [json.loads((tmp_path / t).read_text())["meta"]["wall_clock"] for t in targets]
    first, second = sorted(walls, key=lambda w: w["runs_start"])
    assert first["runs_end"] <= second["runs_start"], walls  # the timed runs never overlapped
    logs = "".join(p.read_text() for p in (tmp_path / f"logs/{RUN}/measure").glob("*.log"))
    assert "another CPU measurement holds" in logs
    summary = json.loads((tmp_path / targets[0]).read_text())
    assert set(summary["meta"]["host_load"]) == {"before_timed_runs", "after_timed_runs"}
