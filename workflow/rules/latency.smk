# All configurations of one run into the study's stage latency table, and their energy per stage.


rule stage_latency:
    conda:
        "../../envs/analysis.yaml"
    input:
        summaries=per_config(rules.measure.output.summary, CONFIGS),
        code=code("latency/table.py"),
    output:
        reported("results/e1_stage_latency_breakdown.json", "run_metadata.rst", "Run metadata"),
    log:
        "logs/stage_latency.log",
    shell:
        "{E1} {log} stage-latency --out {output} {input.summaries}"


rule stage_energy:
    conda:
        "../../envs/analysis.yaml"
    input:
        latency=rules.stage_latency.output[0],
        code=code("energy/table.py"),
    output:
        "results/e1_stage_energy.json",
    log:
        "logs/stage_energy.log",
    shell:
        "{E1} {log} stage-energy --latency {input.latency} --out {output}"


rule cross_model:
    # every model of `models` at the cross_model regime, stage by stage, with each stage's analytic FLOPs
    conda:
        "../../envs/analysis.yaml"
    input:
        summaries=cross_summaries,
        code=code("crossmodel.py", arch=False),
    output:
        "results/e1_cross_model.json",
    log:
        "logs/cross_model.log",
    shell:
        "{E1} {log} cross-model --out {output} {input.summaries}"
