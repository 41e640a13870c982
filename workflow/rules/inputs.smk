# Deterministic study inputs: synthetic images per resolution, prompt records per prompt, job specs.


rule image:
    conda:
        "../../envs/gpu.yaml"
    input:
        code=code("inputs/images.py"),
    output:
        "inputs/images/{image}.png",
    params:
        seed=config["seed"],
    log:
        "logs/inputs/image_{image}.log",
    shell:
        "{E1} {log} image --size {wildcards.image} --seed {params.seed} --out {output}"


rule prompt:
    # The record (token ids and counts) is made while planning (e1.inputs.prompts): the job only writes it.
    localrule: True
    output:
        "inputs/prompts/{model}/{prompt}.json",
    params:
        record=prompt_record,
    log:
        "logs/inputs/prompt_{model}_{prompt}.log",
    run:
        write_json(output[0], params.record)
        Path(log[0]).write_text(f"{output[0]}: {params.record['text_tokens']} text tokens, {params.record['source']}\n")


rule spec:
    # What one job is told to do (e1/jobs/spec.py), as a file: no job spec travels on a command line.
    localrule: True
    output:
        SPEC,
    params:
        job=job_spec,
    log:
        "logs/{run}/spec/{kind}/{stem}.log",
    run:
        write_json(output[0], params.job)
        Path(log[0]).write_text(f"{output[0]}: {wildcards.kind} spec\n")
