# All configurations of one run into the study's stage latency breakdown.


rule aggregate:
    input:
        summaries=all_summaries,
        code=CODE_AGGREGATE,
    output:
        "results/e1_stage_latency_breakdown.json",
    log:
        "logs/aggregate.log",
    shell:
        "{E1} aggregate --out {output} {input.summaries} 2> {log}"
