# E1: stage-aware latency decomposition of MolmoE-1B. Thin entry point: validate, then include rules.
# No heavy imports here: every cluster job re-parses this file.
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"  # `snakemake --report report.html`: figures/, captions in workflow/report/


validate(config, "workflow/schemas/config.schema.yaml")

REPO = Path(workflow.basedir)


include: "workflow/rules/common.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/flops.smk"


rule all:
    default_target: True
    input:
        "figures/e1_stage_stack_plot.png",
        # the profiler breakdown covers eager-decode variants (PROFILE_IDS); none when all decode is graphed
        *(["figures/e1_attention_ffn_breakdown.png"] if PROFILE_IDS else []),
        "figures/e1_flops_vs_latency.png",
        "figures/e1_scaling_curves.png",
        "results/e1_findings.md",
