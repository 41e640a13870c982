# Shared helpers: run identity (model/device/dtype policy), config ids, code dependencies, job params.
import json
import os
import shutil
import subprocess
import sys
import types


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

# Rules run the package through its CLI with the interpreter that runs snakemake.
E1 = f'"{sys.executable}" -m e1'

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
CODE_PLOT_STACK = code("plots/stack.py", "plots/common.py")
CODE_PROFILE = CODE_MEASURE + code("profiling.py", "components.py")
CODE_PARSE = code("trace.py", "breakdown.py", "components.py")
CODE_PLOT_BREAKDOWN = code("plots/breakdown.py", "plots/common.py")


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


# --- FLOPs, roofline, scaling, findings (workflow/rules/flops.smk) ------------------------------------
CODE_CALIBRATE = code("calibrate.py", "measure.py", "envinfo.py", "model/build.py")
CODE_FLOPCHECK = CODE_MEASURE + code("flopcheck.py", "flops.py")
CODE_FLOPS_VS_LATENCY = code("flops_vs_latency.py", "flops.py", "traffic.py", "correlation.py", "arch.py",
                             f"archs/{MODEL}.json")
CODE_PLOT_FLOPS = code("plots/flops.py", "plots/common.py")
CODE_PLOT_SCALING = code("plots/scaling.py", "plots/common.py")
CODE_FINDINGS = code("findings.py")
FIRST_PROMPT = next(iter(PROMPTS))  # the flop check runs once per image, with the first prompt


def calibrate_params(wildcards):
    """The calibration job's device and dtype (JSON)."""
    return json.dumps({"device": DEVICE, "dtype": DTYPE}, sort_keys=True)


def flopcheck_spec(wildcards):
    """One dict per flop-check job (JSON): a measure job's model and inputs, without the timing protocol."""
    spec = json.loads(measure_spec(types.SimpleNamespace(image=wildcards.image, prompt=wildcards.prompt, decode=1)))
    for key in ("id", "decode_tokens", "warmup", "timed"):
        del spec[key]
    return json.dumps(spec, sort_keys=True)


def all_flopchecks(wildcards):
    return [f"results/{RUN}/flopcheck/{image}__{FIRST_PROMPT}.json" for image in config["images"]]


def all_parquets(wildcards):
    return [f"results/{RUN}/measure/{cid}.parquet" for cid in CONFIG_IDS]
