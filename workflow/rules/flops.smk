# FLOPs against latency: FlopCounterMode cross-check, measured device ceilings (roofline), scaling, findings.


rule calibrate:
    conda:
        "../../envs/gpu.yaml"
    input:
        spec=spec_input("calibrate", "device"),
        code=code("roofline/calibrate.py", "jobs/claims.py"),
    output:
        f"results/{RUN}/calibrate.json",
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{RUN}/calibrate.log",
    shell:
        "{E1} {log} calibrate --spec {input.spec} --out {output}"


rule flop_check:
    conda:
        "../../envs/gpu.yaml"
    input:
        spec=spec_input("flop_check", "{image}__{prompt}__{variant}"),
        image=rules.image.output[0],
        prompt=f"inputs/prompts/{MODEL}/{{prompt}}.json",
        model=model_files(MODEL),
        code=code("roofline/flopcheck.py", "jobs/claims.py"),
    output:
        f"results/{RUN}/flopcheck/{{image}}__{{prompt}}__{{variant}}.json",
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{RUN}/flop_check/{{image}}__{{prompt}}__{{variant}}.log",
    shell:
        "{E1} {log} flop-check --spec {input.spec} --out {output}"


rule flops_vs_latency:
    conda:
        "../../envs/analysis.yaml"
    input:
        latency=rules.stage_latency.output[0],
        calibrate=rules.calibrate.output[0],
        checks=[rules.flop_check.output[0].format(image=image, prompt=FIRST_PROMPT, variant=variant)
                for image in config["images"] for variant in FLOPCHECK_VARIANTS],
        code=code("roofline/flops_vs_latency.py"),
    output:
        "results/e1_flops_vs_latency.json",
    log:
        "logs/flops_vs_latency.log",
    shell:
        "{E1} {log} flops-vs-latency --latency {input.latency} --calibrate {input.calibrate}"
        " --flop-checks {input.checks} --out {output}"


rule plot_flops:
    conda:
        "../../envs/analysis.yaml"
    input:
        flops=rules.flops_vs_latency.output[0],
        code=code("plots/flops.py"),
    output:
        figure("e1_flops_vs_latency"),
    log:
        "logs/plot_flops.log",
    shell:
        "{E1} {log} plot-flops --flops {input.flops} --out {output}"


rule plot_scaling:
    conda:
        "../../envs/analysis.yaml"
    input:
        latency=rules.stage_latency.output[0],
        parquets=per_config(rules.measure.output.parquet, CONFIGS),
        code=code("plots/scaling.py"),
    output:
        figure("e1_scaling_curves"),
    log:
        "logs/plot_scaling.log",
    shell:
        "{E1} {log} plot-scaling --latency {input.latency} --parquets {input.parquets} --out {output}"


rule findings:
    conda:
        "../../envs/analysis.yaml"
    input:
        latency=rules.stage_latency.output[0],
        flops=rules.flops_vs_latency.output[0],
        energy=rules.stage_energy.output[0],
        components=rules.breakdown.output,
        fidelity=per_config(rules.fidelity.output[0], FIDELITY),
        cross=rules.cross_model.output if CROSS_IN_ALL else [],
        code=code("findings.py"),
    output:
        md="results/e1_findings.md",
        json="results/e1_findings.json",
    params:
        cross=f"--cross-model {rules.cross_model.output[0]}" if CROSS_IN_ALL else "",
    log:
        "logs/findings.log",
    shell:
        "{E1} {log} findings --latency {input.latency} --flops {input.flops} --energy {input.energy}"
        " --components {input.components}"
        " --fidelity {input.fidelity} {params.cross} --out-md {output.md} --out-json {output.json}"
