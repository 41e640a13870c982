# Figures from the stage latency table (stages, expert load), the stage energy table and the component
# breakdown.


rule plot_stack:
    conda:
        "../../envs/analysis.yaml"
    input:
        latency=rules.stage_latency.output[0],
        code=code("plots/stack.py"),
    output:
        figure("e1_stage_stack_plot"),
    log:
        "logs/plot_stack.log",
    shell:
        "{E1} {log} plot-stack --latency {input.latency} --out {output}"


rule plot_breakdown:
    conda:
        "../../envs/analysis.yaml"
    input:
        breakdown=rules.breakdown.output[0],
        code=code("plots/breakdown.py"),
    output:
        figure("e1_attention_ffn_breakdown"),
    log:
        "logs/plot_breakdown.log",
    shell:
        "{E1} {log} plot-breakdown --breakdown {input.breakdown} --out {output}"


rule plot_energy:
    conda:
        "../../envs/analysis.yaml"
    input:
        energy=rules.stage_energy.output[0],
        code=code("plots/energy.py"),
    output:
        figure("e1_stage_energy_plot"),
    log:
        "logs/plot_energy.log",
    shell:
        "{E1} {log} plot-energy --energy {input.energy} --out {output}"


rule plot_routing:
    conda:
        "../../envs/analysis.yaml"
    input:
        latency=rules.stage_latency.output[0],
        code=code("plots/routing.py"),
    output:
        figure("e1_expert_load"),
    log:
        "logs/plot_routing.log",
    shell:
        "{E1} {log} plot-routing --latency {input.latency} --out {output}"


rule plot_cross_model:
    conda:
        "../../envs/analysis.yaml"
    input:
        table=rules.cross_model.output[0],
        code=code("plots/cross_model.py"),
    output:
        figure("e1_cross_model"),
    log:
        "logs/plot_cross_model.log",
    shell:
        "{E1} {log} plot-cross-model --table {input.table} --out {output}"


CROSS_OUTPUTS = [*rules.cross_model.output, *rules.plot_cross_model.output]
