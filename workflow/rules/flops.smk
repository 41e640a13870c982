# FLOPs against latency: FlopCounterMode cross-check, measured device ceilings (roofline), scaling, findings.


rule calibrate:
    conda:
        "../../envs/gpu.yaml"
    input:
        code=CODE_CALIBRATE,
    output:
        f"results/{RUN}/calibrate.json",
    params:
        job=calibrate_params,
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{RUN}/calibrate.log",
    shell:
        "{E1} calibrate --job {params.job:q} --out {output} 2> {log}"


rule flop_check:
    conda:
        "../../envs/gpu.yaml"
    input:
        image="inputs/images/{image}.png",
        prompt="inputs/prompts/{prompt}.json",
        code=CODE_FLOPCHECK,
    output:
        f"results/{RUN}/flopcheck/{{image}}__{{prompt}}__{{variant}}.json",
    params:
        spec=flopcheck_spec,
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{RUN}/flop_check/{{image}}__{{prompt}}__{{variant}}.log",
    shell:
        "{E1} flop-check --spec {params.spec:q} --out {output} 2> {log}"


rule flops_vs_latency:
    conda:
        "../../envs/analysis.yaml"
    input:
        breakdown="results/e1_stage_latency_breakdown.json",
        calibrate=f"results/{RUN}/calibrate.json",
        checks=all_flopchecks,
        code=CODE_FLOPS_VS_LATENCY,
    output:
        "results/e1_flops_vs_latency.json",
    log:
        "logs/flops_vs_latency.log",
    shell:
        "{E1} flops-vs-latency --breakdown {input.breakdown} --calibrate {input.calibrate}"
        " --flop-checks {input.checks} --out {output} 2> {log}"


rule plot_flops:
    conda:
        "../../envs/analysis.yaml"
    input:
        flops="results/e1_flops_vs_latency.json",
        code=CODE_PLOT_FLOPS,
    output:
        figure("e1_flops_vs_latency"),
    log:
        "logs/plot_flops.log",
    shell:
        "{E1} plot-flops --flops {input.flops} --out {output} 2> {log}"


rule plot_scaling:
    conda:
        "../../envs/analysis.yaml"
    input:
        breakdown="results/e1_stage_latency_breakdown.json",
        parquets=all_parquets,
        code=CODE_PLOT_SCALING,
    output:
        figure("e1_scaling_curves"),
    log:
        "logs/plot_scaling.log",
    shell:
        "{E1} plot-scaling --breakdown {input.breakdown} --parquets {input.parquets} --out {output} 2> {log}"


rule findings:
    conda:
        "../../envs/analysis.yaml"
    input:
        breakdown="results/e1_stage_latency_breakdown.json",
        flops="results/e1_flops_vs_latency.json",
        components=findings_components,
        code=CODE_FINDINGS,
    output:
        md="results/e1_findings.md",
        json="results/e1_findings.json",
    log:
        "logs/findings.log",
    shell:
        "{E1} findings --breakdown {input.breakdown} --flops {input.flops} --components {input.components}"
        " --out-md {output.md} --out-json {output.json} 2> {log}"
