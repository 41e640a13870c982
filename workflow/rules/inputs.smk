# Deterministic study inputs: synthetic images per resolution, prompts per length class.


rule image:
    conda:
        "../../envs/gpu.yaml"
    input:
        code=CODE_IMAGE,
    output:
        "inputs/images/{image}.png",
    params:
        seed=config["seed"],
    log:
        "logs/inputs/image_{image}.log",
    shell:
        "{E1} image --size {wildcards.image} --seed {params.seed} --out {output} > {log} 2>&1"


rule prompt:
    conda:
        "../../envs/gpu.yaml"
    input:
        code=CODE_PROMPT,
    output:
        "inputs/prompts/{prompt}.json",
    params:
        job=prompt_params,
    log:
        "logs/inputs/prompt_{prompt}.log",
    shell:
        "{E1} prompt --name {wildcards.prompt} --job {params.job:q} --out {output} > {log} 2>&1"
