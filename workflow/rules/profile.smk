# torch.profiler traces with stage/component ranges (GPU jobs, separate from the timed runs), their
# attribution to components, and the study's component breakdown.


rule profile:
    conda:
        "../../envs/gpu.yaml"
    input:
        spec=spec_input("profile", CONFIG),
        image=rules.image.output[0],
        prompt=f"inputs/prompts/{MODEL}/{{prompt}}.json",
        model=model_files(MODEL),
        code=code("profile/capture.py", "jobs/claims.py"),
    output:
        trace=f"results/{RUN}/profile/{CONFIG}.trace.json.gz",
        summary=f"results/{RUN}/profile/{CONFIG}.json",
        routing=f"results/{RUN}/profile/{CONFIG}.routing.parquet",
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{RUN}/profile/{CONFIG}.log",
    shell:
        "{E1} {log} profile --spec {input.spec} --out-trace {output.trace} --out-json {output.summary}"
        " --out-routing {output.routing}"


rule parse_trace:
    conda:
        "../../envs/analysis.yaml"
    input:
        trace=rules.profile.output.trace,
        summary=rules.profile.output.summary,
        routing=rules.profile.output.routing,
        code=code("profile/breakdown.py"),
    output:
        components=f"results/{RUN}/breakdown/{CONFIG}.components.parquet",
        stages=f"results/{RUN}/breakdown/{CONFIG}.stages.parquet",
        kernels=f"results/{RUN}/breakdown/{CONFIG}.kernels.parquet",
        summary=f"results/{RUN}/breakdown/{CONFIG}.json",
    log:
        f"logs/{RUN}/parse_trace/{CONFIG}.log",
    shell:
        "{E1} {log} parse-trace --trace {input.trace} --profile {input.summary} --routing {input.routing}"
        " --out-components {output.components} --out-stages {output.stages} --out-kernels {output.kernels}"
        " --out-json {output.summary}"


rule breakdown:
    conda:
        "../../envs/analysis.yaml"
    input:
        summaries=per_config(rules.parse_trace.output.summary, PROFILED),
        kernels=per_config(rules.parse_trace.output.kernels, PROFILED),
        measured=per_config(rules.measure.output.summary, PROFILED),
        code=code("profile/breakdown.py"),
    output:
        "results/e1_attention_ffn_breakdown.json",
    log:
        "logs/breakdown.log",
    shell:
        "{E1} {log} breakdown --out {output} --summaries {input.summaries} --kernels {input.kernels}"
        " --measured {input.measured}"
