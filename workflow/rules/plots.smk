# Figures from the aggregated results.


rule plot_stack:
    conda:
        "../../envs/analysis.yaml"
    input:
        breakdown="results/e1_stage_latency_breakdown.json",
        code=CODE_PLOT_STACK,
    output:
        figure("e1_stage_stack_plot"),
    log:
        "logs/plot_stack.log",
    shell:
        "{E1} plot-stack --breakdown {input.breakdown} --out {output} 2> {log}"


rule plot_breakdown:
    conda:
        "../../envs/analysis.yaml"
    input:
        breakdown="results/e1_attention_ffn_breakdown.json",
        code=CODE_PLOT_BREAKDOWN,
    output:
        figure("e1_attention_ffn_breakdown"),
    log:
        "logs/plot_breakdown.log",
    shell:
        "{E1} plot-breakdown --breakdown {input.breakdown} --out {output} 2> {log}"
