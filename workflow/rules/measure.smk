# Per-configuration latency measurement: one GPU job each (gpu=1 keeps timing jobs apart).


rule measure:
    conda:
        "../../envs/gpu.yaml"
    input:
        image="inputs/images/{image}.png",
        prompt="inputs/prompts/{prompt}.json",
        code=CODE_MEASURE,
    output:
        parquet=measure_path("parquet"),
        summary=measure_path("json"),
    params:
        spec=measure_spec,
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{RUN}/measure/{CONFIG}.log",
    shell:
        "{E1} measure --spec {params.spec:q} --out-parquet {output.parquet} --out-json {output.summary} 2> {log}"
