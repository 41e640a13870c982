# torch.profiler traces with stage/component ranges (GPU jobs, separate from the timed runs).


rule profile:
    conda:
        "../../envs/gpu.yaml"
    input:
        image="inputs/images/{image}.png",
        prompt="inputs/prompts/{prompt}.json",
        code=CODE_PROFILE,
    output:
        trace=profile_path("trace.json.gz"),
        summary=profile_path("json"),
        routing=profile_path("routing.parquet"),
    params:
        spec=profile_spec,
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{RUN}/profile/{CONFIG}.log",
    shell:
        "{E1} profile --spec {params.spec:q} --out-trace {output.trace} --out-json {output.summary}"
        " --out-routing {output.routing} 2> {log}"


rule parse_trace:
    conda:
        "../../envs/analysis.yaml"
    input:
        trace=profile_path("trace.json.gz"),
        summary=profile_path("json"),
        routing=profile_path("routing.parquet"),
        code=CODE_PARSE,
    output:
        components=f"results/{RUN}/breakdown/{CONFIG}.components.parquet",
        stages=f"results/{RUN}/breakdown/{CONFIG}.stages.parquet",
        summary=f"results/{RUN}/breakdown/{CONFIG}.json",
    log:
        f"logs/{RUN}/parse_trace/{CONFIG}.log",
    shell:
        "{E1} parse-trace --trace {input.trace} --profile {input.summary} --routing {input.routing}"
        " --out-components {output.components} --out-stages {output.stages} --out-json {output.summary} 2> {log}"


rule breakdown:
    conda:
        "../../envs/analysis.yaml"
    input:
        summaries=all_breakdowns,
        measured=profiled_summaries,
        code=CODE_PARSE,
    output:
        "results/e1_attention_ffn_breakdown.json",
    log:
        "logs/breakdown.log",
    shell:
        "{E1} breakdown --out {output} --summaries {input.summaries} --measured {input.measured} 2> {log}"
