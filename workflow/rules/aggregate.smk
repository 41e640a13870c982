# All configurations of one run into the study's stage latency breakdown.


rule aggregate:
    conda:
        "../../envs/analysis.yaml"
    input:
        summaries=all_summaries,
        code=CODE_AGGREGATE,
    output:
        report("results/e1_stage_latency_breakdown.json", caption="../report/run_metadata.rst", category="Run metadata"),
    log:
        "logs/aggregate.log",
    shell:
        "{E1} aggregate --out {output} {input.summaries} 2> {log}"
