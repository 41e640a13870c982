# Shared helpers: run identity (model/device/dtype policy), config ids, code dependencies, job params.
import json
import os
import shutil
import subprocess
import sys


def detect_device():
    """cuda if nvidia-smi lists a GPU here (no torch import), else cpu."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return "cpu"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "cpu"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    return "cuda" if out.returncode == 0 and "GPU" in out.stdout else "cpu"


DEVICE = detect_device() if config["device"] == "auto" else config["device"]
ON_GPU = DEVICE.startswith("cuda")
MODEL = config["model"] if config["model"] != "auto" else ("molmoe-1b" if ON_GPU else "molmoe-1b-tiny")
DTYPE = config["dtype"] if config["dtype"] != "auto" else ("bfloat16" if ON_GPU else "float32")
RUN = f"{MODEL}_{DEVICE.replace(':', '')}_{DTYPE}"  # results/<RUN>/: CPU and GPU results never mix

def e1_command():
    """How rules run the package's CLI: with the interpreter that runs snakemake; under `--sdm conda` with
    the python of the rule's environment (envs/*.yaml, activated by snakemake), importing e1 from this
    checkout's src/ (the environments do not install the package, so they need no path to the repo)."""
    if any(m.name == "CONDA" for m in workflow.deployment_settings.deployment_method):
        return f'env PYTHONPATH="{REPO / "src"}" python -m e1'
    return f'"{sys.executable}" -m e1'


E1 = e1_command()

PROMPTS = config["prompts"]
CONFIG_IDS = [
    f"{image}__{prompt}__n{n}"
    for image in config["images"]
    for prompt in PROMPTS
    for n in config["decode_tokens"]
]

wildcard_constraints:
    image=r"[1-9][0-9]*x[1-9][0-9]*",
    prompt=r"[A-Za-z0-9-]+",
    decode=r"[0-9]+",


def code(*names):
    """Package modules a rule depends on: editing them reruns that rule (and only what follows)."""
    return [str(REPO / "src" / "e1" / name) for name in names]


# The CLI (cli.py) only dispatches to these modules and is left out on purpose: editing it reruns nothing.
CODE_IMAGE = code("inputs.py")
CODE_PROMPT = code("inputs.py", "arch.py", f"archs/{MODEL}.json")
CODE_MEASURE = code(
    "measure.py", "timing.py", "stats.py", "envinfo.py", "preprocess.py", "arch.py", f"archs/{MODEL}.json",
    "model/molmoe.py", "model/vision.py", "model/connector.py", "model/build.py",
)
CODE_AGGREGATE = code("aggregate.py")
CODE_PLOT_STACK = code("plots/stack.py")
CODE_PROFILE = CODE_MEASURE + code("profiling.py", "components.py")
CODE_PARSE = code("trace.py", "breakdown.py", "components.py")
CODE_PLOT_BREAKDOWN = code("plots/breakdown.py")


def measure_path(ext):
    return f"results/{RUN}/measure/{{image}}__{{prompt}}__n{{decode}}.{ext}"


def all_summaries(wildcards):
    return [f"results/{RUN}/measure/{cid}.json" for cid in CONFIG_IDS]


def prompt_params(wildcards):
    """One dict per prompt job, as JSON."""
    p = PROMPTS[wildcards.prompt]
    return json.dumps({"model": MODEL, "tokens": p["tokens"], "text": p.get("text"),
                       "tokenizer": config.get("tokenizer"), "seed": config["seed"]})


def measure_spec(wildcards):
    """One dict per measurement job (JSON): everything that decides its numbers."""
    return json.dumps({
        "id": f"{wildcards.image}__{wildcards.prompt}__n{wildcards.decode}",
        "model": MODEL, "device": DEVICE, "dtype": DTYPE, "weights": config["weights"], "seed": config["seed"],
        "attn_implementation": config.get("attn_implementation", "sdpa"),
        "experts_implementation": config.get("experts_implementation", "grouped_mm"),
        "image": wildcards.image, "image_path": f"inputs/images/{wildcards.image}.png",
        "prompt": wildcards.prompt, "prompt_path": f"inputs/prompts/{wildcards.prompt}.json",
        "decode_tokens": int(wildcards.decode),
        "warmup": config["protocol"]["warmup"], "timed": config["protocol"]["timed"],
    }, sort_keys=True)


def profile_path(name):
    return f"results/{RUN}/profile/{{image}}__{{prompt}}__n{{decode}}.{name}"


def all_breakdowns(wildcards):
    return [f"results/{RUN}/breakdown/{cid}.json" for cid in CONFIG_IDS]


def profile_spec(wildcards):
    """One dict per profile job (JSON): the measure spec plus the profiler settings."""
    spec = json.loads(measure_spec(wildcards))
    spec.update(warmup=config["profile"]["warmup"], profile_runs=config["profile"]["runs"],
                max_decode_steps=config["profile"]["max_decode_steps"])
    del spec["timed"]
    return json.dumps(spec, sort_keys=True)


def figure(name):
    """figures/<name>.png as an output shown in `snakemake --report`, captioned by workflow/report/<name>.rst."""
    return report(f"figures/{name}.png", caption=str(REPO / "workflow" / "report" / f"{name}.rst"), category="Figures")
