# All configurations of one run into the study's stage latency table.


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
