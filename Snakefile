# E1: stage-aware latency decomposition of MolmoE-1B. Thin entry point: check and validate the config, then
# include the rules. No heavy imports here: every cluster job re-parses this file.
import sys
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

min_version("9.0")

REPO = Path(workflow.basedir)
sys.path.insert(0, str(REPO / "src"))
from e1.configfile import coerce_strings, load_config_file  # noqa: E402  (torch-free)

if Path("config.yaml").exists():  # Snakemake's own reader names neither the file nor the line of a fault
    try:
        load_config_file("config.yaml")
    except ValueError as e:
        raise WorkflowError(str(e)) from None


configfile: "config.yaml"


report: "workflow/report/workflow.rst"  # `snakemake --report report.html`: figures/, captions in workflow/report/


SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
coerce_strings(config, yaml.safe_load(SCHEMA.read_text()))  # `--config decode_tokens=[16]` gives strings
validate(config, str(SCHEMA))


include: "workflow/rules/common.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/measure.smk"
include: "workflow/rules/latency.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/flops.smk"

STUDY = [  # every study-level artifact: rule all rebuilds any that is lost
    *rules.stage_latency.output, *rules.plot_stack.output, *rules.plot_routing.output,
    *rules.stage_energy.output, *rules.plot_energy.output,
    *rules.breakdown.output, *rules.plot_breakdown.output,
    *rules.flops_vs_latency.output, *rules.plot_flops.output, *rules.plot_scaling.output, *rules.findings.output,
    *(CROSS_OUTPUTS if CROSS_IN_ALL else []),  # the cross-model study, when its regime is in the run's grid
]


rule all:
    default_target: True
    input:
        STUDY,


if "--report" in sys.argv:
    missing = [f for f in STUDY if not Path(f).exists()]
    if missing:
        print(f"e1: the report shows what exists; not built yet: {', '.join(missing)} "
              "(`snakemake --cores 1` builds everything)", file=sys.stderr)
