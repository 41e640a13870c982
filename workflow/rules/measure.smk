# Per-configuration latency measurement: one GPU job each (gpu=1 keeps timing jobs apart).


rule measure:
    # {run} is <model>_<device>_<dtype>: the run's model, and every model of the cross-model study
    conda:
        "../../envs/gpu.yaml"
    input:
        spec=spec_input("measure", CONFIG, run="{run}"),
        image=rules.image.output[0],
        prompt=prompt_file,
        code=code("latency/measure.py", "jobs/claims.py", arch=False),
        model=model_code,
    output:
        parquet=f"results/{{run}}/measure/{CONFIG}.parquet",
        summary=f"results/{{run}}/measure/{CONFIG}.json",
    threads: 1 if ON_GPU else workflow.cores
    resources:
        gpu=1 if ON_GPU else 0,
    log:
        f"logs/{{run}}/measure/{CONFIG}.log",
    shell:
        "{E1} {log} measure --spec {input.spec} --out-parquet {output.parquet} --out-json {output.summary}"


rule fidelity:
    # e1's prefill + decode loop against transformers' generate(), same model and inputs, in one process
    conda:
        "../../envs/gpu.yaml"
    input:
        spec=spec_input("fidelity", CONFIG),
        image=rules.image.output[0],
        prompt=f"inputs/prompts/{MODEL}/{{prompt}}.json",
        model=model_files(MODEL),
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
