"""The conda environments (envs/*.yaml, for `snakemake --sdm conda`) agree with pyproject.toml.

Every package an environment lists, other than python, is a dependency in pyproject.toml's [project]
(conda-forge names mapped to PyPI names) with the same version range; python's range is
requires-python. Every rule names one of these files, and each file is used. Conda itself is not
needed: the files and the rules are parsed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib"}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pypi_requirements() -> dict[str, SpecifierSet]:
    reqs = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    return {r.name.lower(): r.specifier for r in reqs}


def conda_spec(entry: str) -> tuple[str, SpecifierSet]:
    """'pytorch >=2.11' or 'transformers >=5.17,<6' -> (PyPI name, specifier)."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", entry.strip())
    assert m, f"cannot parse conda dependency {entry!r}"
    name, spec = m.group(1).lower(), m.group(2).replace(" ", "")
    assert "=" not in spec or re.search(r"[<>!=]=|[<>]", spec), f"{entry!r}: use PEP 440 style ranges (>=, <)"
    return CONDA_TO_PYPI.get(name, name), SpecifierSet(spec)


def test_there_are_environments():
    assert {p.name for p in ENVS} >= {"gpu.yaml", "analysis.yaml"}


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_matches_pyproject(env):
    data = yaml.safe_load(env.read_text())
    assert data["channels"][0] == "conda-forge", env.name
    deps = data["dependencies"]
    assert all(isinstance(d, str) for d in deps), f"{env.name}: no pip section expected (e1 is not installed)"
    wanted = pypi_requirements()
    seen = set()
    for entry in deps:
        name, spec = conda_spec(entry)
        assert name not in seen, f"{env.name}: {name} listed twice"
        seen.add(name)
        if name == "python":
            assert spec == SpecifierSet(pyproject()["project"]["requires-python"]), f"{env.name}: {entry!r}"
            continue
        assert name in wanted, f"{env.name}: {entry!r} is not a dependency in pyproject.toml"
        assert spec == wanted[name], f"{env.name}: {entry!r} but pyproject.toml says {name}{wanted[name]}"
    assert "python" in seen, f"{env.name}: no python"


LOCAL_RULES = {"prompt", "spec"}  # `run:` blocks in snakemake's own process: they write planned records, no env


def rule_envs() -> dict[str, str]:
    """{rule: env file} from the conda: directives in workflow/rules/*.smk (rule `all` runs nothing; the local
    rules run inside snakemake)."""
    out = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule \w+:)", smk.read_text(), flags=re.M)[1:]:
            name = re.match(r"rule (\w+):", block).group(1)
            if "    localrule: True" in block:
                assert name in LOCAL_RULES and "    run:" in block, f"rule {name}: unexpected local rule"
                continue
            m = re.search(r"^    conda:\n\s+\"([^\"]+)\"", block, re.M)
            assert m, f"rule {name} ({smk.name}) has no conda: environment"
            path = (smk.parent / m.group(1)).resolve()
            assert path.is_file(), f"rule {name}: conda env {m.group(1)} does not exist"
            out[name] = path.name
    return out


def test_every_rule_has_an_environment_and_every_environment_is_used():
    envs = rule_envs()
    assert {"measure", "profile", "stage_latency", "plot_stack"} <= set(envs)
    assert envs["measure"] == envs["profile"] == "gpu.yaml"
    assert envs["stage_latency"] == envs["plot_stack"] == "analysis.yaml"
    assert set(envs.values()) == {p.name for p in ENVS}


STAND_IN_CONDA = """#!/bin/sh
# Answers the queries snakemake makes while planning under --sdm conda; builds nothing.
case "$*" in
  "info --json") echo '{"conda_prefix": "%(p)s", "root_prefix": "%(p)s", "envs_dirs": ["%(p)s/envs"], "conda_version": "24.11.0", "platform": "linux-64"}';;
  "--version") echo "conda 24.11.0";;
  "config --get channel_priority --json") echo '{"get": {"channel_priority": "strict"}, "success": true}';;
  *) echo "stand-in conda cannot: $*" >&2; exit 1;;
esac
"""


@pytest.mark.slow
def test_rules_run_the_environment_python_under_sdm_conda(tmp_path):
    """Planned with --sdm conda (conda itself replaced by a stand-in that only answers snakemake's
    queries), every job runs `python -m e1` (workflow/scripts/e1-job) from the activated environment with e1
    from this checkout's src/; without it, the interpreter that runs snakemake."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    conda = bin_dir / "conda"
    conda.write_text(STAND_IN_CONDA % {"p": tmp_path})
    conda.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}

    def shell_commands(*extra):
        cmd = [sys.executable, "-m", "snakemake", "-n", "-p", *extra, "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(tmp_path), "--cores", "1", "--configfile", str(REPO / "tests" / "small_grid.yaml"),
               "--config", "images=[336x336]", "select_prompts=[short]", "decode_tokens=[2]"]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        return [c for c in re.findall(r"^Shell command: (.*)$", p.stdout + p.stderr, re.M) if c != "None"]  # all

    with_conda = shell_commands("--sdm", "conda")
    assert len(with_conda) >= 9  # image, measure, stage_latency, plots, profile, parse_trace, breakdown, ...
    job = REPO / "workflow" / "scripts" / "e1-job"
    assert all(c.startswith(f'bash "{job}" "python" "{REPO / "src"}" ') for c in with_conda), [c[:160] for c in with_conda]
    plain = shell_commands()
    assert all(c.startswith(f'bash "{job}" "{sys.executable}" "{REPO / "src"}" ') for c in plain), [c[:160] for c in plain]


# The modules the rules on envs/analysis.yaml run (through `python -m e1 <command>`): no torch there.
ANALYSIS_MODULES = ("e1.cli", "e1.latency.table", "e1.profile.trace", "e1.profile.breakdown",
                    "e1.roofline.flops_vs_latency", "e1.findings", "e1.plots.stack", "e1.plots.breakdown",
                    "e1.plots.flops", "e1.plots.scaling")
# What planning imports (workflow/rules/common.smk): the Snakefile runs in snakemake's environment, no torch.
PLANNING_MODULES = ("e1.knobs", "e1.configfile", "e1.inputs.images", "e1.inputs.prompts", "e1.jobs.nvsmi",
                    "e1.jobs.spec", "e1.jobs.io", "e1.model.arch", "e1.model.preprocess")


def test_analysis_rules_run_without_torch():
    assert set(rule_envs().values()) == {"gpu.yaml", "analysis.yaml"}
    block = "import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
    for module in (*ANALYSIS_MODULES, *PLANNING_MODULES):
        p = subprocess.run([sys.executable, "-c", block + f"import {module}"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
        assert p.returncode == 0, f"{module} needs torch or transformers:\n{p.stderr[-2000:]}"
