# Per-configuration latency measurement: one GPU job each (gpu=1 keeps timing jobs apart).


rule measure:
    conda:
        "../../envs/gpu.yaml"
    input:
        spec=spec_input("measure", CONFIG),
        image=rules.image.output[0],
        prompt=rules.prompt.output[0],
        code=code("latency/measure.py", "jobs/claims.py"),
    output:
        parquet=f"results/{RUN}/measure/{CONFIG}.parquet",
        summary=f"results/{RUN}/measure/{CONFIG}.json",
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{RUN}/measure/{CONFIG}.log",
    shell:
        "{E1} {log} measure --spec {input.spec} --out-parquet {output.parquet} --out-json {output.summary}"


rule fidelity:
    # e1's prefill + decode loop against transformers' generate(), same model and inputs, in one process
    conda:
        "../../envs/gpu.yaml"
    input:
        spec=spec_input("fidelity", CONFIG),
        image=rules.image.output[0],
        prompt=rules.prompt.output[0],
        code=code("latency/fidelity.py", "jobs/claims.py"),
    output:
        f"results/{RUN}/fidelity/{CONFIG}.json",
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{RUN}/fidelity/{CONFIG}.log",
    shell:
        "{E1} {log} fidelity --spec {input.spec} --out {output}"
