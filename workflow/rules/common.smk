# Shared helpers: run identity (model/device/dtype policy), config ids, code dependencies, job params.
import ast
import itertools
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
ARCH = json.loads((REPO / "src" / "e1" / "archs" / f"{MODEL}.json").read_text())  # shipped top-k, max_crops


def axis(key, default):
    """A sweep axis of the config: one value or a list of values."""
    value = config.get(key, default)
    return value if isinstance(value, list) else [value]


def variant_name(knobs):
    """attn.experts.decode_backend.k<top-k>.c<max_crops>, e.g. sdpa.grouped_mm.eager.k8.c12."""
    return (f"{knobs['attn_implementation']}.{knobs['experts_implementation']}.{knobs['decode_backend']}"
            f".k{knobs['moe_top_k']}.c{knobs['max_crops']}")


def variant_problem(knobs):
    """Why a combination of knobs cannot run here (None when it can)."""
    n_experts = ARCH["llm"]["num_experts"]
    if not 1 <= knobs["moe_top_k"] <= n_experts:
        return f"moe_top_k {knobs['moe_top_k']}: {MODEL} has {n_experts} experts; allowed 1..{n_experts}"
    if knobs["decode_backend"] == "cuda_graph":
        if not ON_GPU:
            return f"decode_backend cuda_graph needs device cuda; this run's device is {DEVICE!r}"
        if knobs["attn_implementation"] not in ("sdpa", "eager"):
            return (f"decode_backend cuda_graph with attn_implementation {knobs['attn_implementation']!r};"
                    " allowed: sdpa, eager")
        if knobs["experts_implementation"] not in ("grouped_mm", "batched_mm"):
            return (f"decode_backend cuda_graph with experts_implementation {knobs['experts_implementation']!r};"
                    " allowed: grouped_mm, batched_mm")
        if knobs["experts_implementation"] == "grouped_mm" and DTYPE != "bfloat16":
            return (f"decode_backend cuda_graph with grouped_mm experts in {DTYPE} (grouped_mm copies its offsets"
                    " to the host outside bfloat16); allowed: bfloat16, or batched_mm experts")
    return None


# Sweep axes (each one value or a list): every possible combination is a variant, carried into every
# artifact. Impossible combinations are left out and named; a run where none is possible is an error.
VARIANTS, LEFT_OUT = {}, []
for attn, experts, backend, top_k, crops in itertools.product(
    axis("attn_implementation", "sdpa"), axis("experts_implementation", "grouped_mm"),
    axis("decode_backend", "eager"), axis("moe_top_k", None), axis("max_crops", None),
):
    knobs = {
        "attn_implementation": attn, "experts_implementation": experts, "decode_backend": backend,
        "moe_top_k": ARCH["llm"]["top_k"] if top_k is None else top_k,
        "max_crops": ARCH["preprocess"]["max_crops"] if crops is None else crops,
    }
    problem = variant_problem(knobs)
    if problem:
        LEFT_OUT.append(f"{variant_name(knobs)}: {problem}")
    else:
        VARIANTS[variant_name(knobs)] = knobs
if not VARIANTS:
    raise ValueError("no runnable variant: " + "; ".join(LEFT_OUT))
if LEFT_OUT:
    print(f"e1: {len(LEFT_OUT)} variant(s) left out:\n  " + "\n  ".join(LEFT_OUT), file=sys.stderr)

CONFIG_IDS = [
    f"{image}__{prompt}__n{n}__{variant}"
    for image in config["images"]
    for prompt in PROMPTS
    for n in config["decode_tokens"]
    for variant in VARIANTS
]
# Profiles need per-module ranges, which a graph replay does not show: eager-decode variants only.
PROFILE_IDS = [cid for cid in CONFIG_IDS if VARIANTS[cid.split("__")[-1]]["decode_backend"] == "eager"]

wildcard_constraints:
    image=r"[1-9][0-9]*x[1-9][0-9]*",
    prompt=r"[A-Za-z0-9-]+",
    decode=r"[0-9]+",
    variant=r"[a-z0-9_]+\.[a-z0-9_]+\.(eager|cuda_graph)\.k[0-9]+\.c[0-9]+",

CONFIG = "{image}__{prompt}__n{decode}__{variant}"  # one configuration's file stem


def code(*entries):
    """The package modules a rule's command runs: the entry modules and every e1 module they import,
    transitively (read from their import statements, also those inside functions, not those under
    `if TYPE_CHECKING:`; nothing is imported here), plus the model's architecture file when e1.arch is
    among them. Editing any of them reruns the rule, and only what follows it. The CLI (cli.py) only
    dispatches and is left out: editing it reruns nothing."""
    src = REPO / "src" / "e1"
    seen, todo = set(), [src / e for e in entries]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        hints = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in hints:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "e1":
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "e1"]
            else:
                continue
            for name in names:
                rel = Path(*name.split(".")[1:])
                if rel.parts and (src / f"{rel}.py").is_file():
                    todo.append(src / f"{rel}.py")
    if src / "arch.py" in seen:
        seen.add(src / "archs" / f"{MODEL}.json")
    return sorted(str(f) for f in seen)


CODE_IMAGE = code("inputs.py")
CODE_PROMPT = code("inputs.py", "arch.py")
CODE_MEASURE = code("measure.py", "gpus.py")
CODE_AGGREGATE = code("aggregate.py")
CODE_PLOT_STACK = code("plots/stack.py")
CODE_PROFILE = code("profiling.py", "gpus.py")
CODE_PARSE = code("trace.py", "breakdown.py")
CODE_PLOT_BREAKDOWN = code("plots/breakdown.py")


def measure_path(ext):
    return f"results/{RUN}/measure/{CONFIG}.{ext}"


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
        "id": f"{wildcards.image}__{wildcards.prompt}__n{wildcards.decode}__{wildcards.variant}",
        "model": MODEL, "device": DEVICE, "dtype": DTYPE, "weights": config["weights"], "seed": config["seed"],
        "variant": wildcards.variant, **VARIANTS[wildcards.variant],
        "image": wildcards.image, "image_path": f"inputs/images/{wildcards.image}.png",
        "prompt": wildcards.prompt, "prompt_path": f"inputs/prompts/{wildcards.prompt}.json",
        "decode_tokens": int(wildcards.decode),
        "warmup": config["protocol"]["warmup"], "timed": config["protocol"]["timed"],
    }, sort_keys=True)


def profile_path(name):
    return f"results/{RUN}/profile/{CONFIG}.{name}"


def all_breakdowns(wildcards):
    return [f"results/{RUN}/breakdown/{cid}.json" for cid in PROFILE_IDS]


def profiled_summaries(wildcards):
    """Timed summaries of the profiled configurations (the breakdown compares against them)."""
    return [f"results/{RUN}/measure/{cid}.json" for cid in PROFILE_IDS]


def profile_spec(wildcards):
    """One dict per profile job (JSON): the measure spec plus the profiler settings."""
    spec = json.loads(measure_spec(wildcards))
    spec.update(warmup=config["profile"]["warmup"], profile_runs=config["profile"]["runs"],
                max_decode_steps=config["profile"]["max_decode_steps"])
    del spec["timed"]
    return json.dumps(spec, sort_keys=True)


# --- FLOPs, roofline, scaling, findings (workflow/rules/flops.smk) ------------------------------------
CODE_CALIBRATE = code("calibrate.py", "gpus.py")
CODE_FLOPCHECK = code("flopcheck.py", "gpus.py")
CODE_FLOPS_VS_LATENCY = code("flops_vs_latency.py")
CODE_PLOT_FLOPS = code("plots/flops.py")
CODE_PLOT_SCALING = code("plots/scaling.py")
CODE_FINDINGS = code("findings.py")
FIRST_PROMPT = next(iter(PROMPTS))  # the flop check runs once per image and variant, with the first prompt
# FlopCounterMode sees eager decode only (a graph replay hides its ops): one check per eager-decode variant.
FLOPCHECK_VARIANTS = {variant_name(k): k for k in ({**v, "decode_backend": "eager"} for v in VARIANTS.values())}


def calibrate_params(wildcards):
    """The calibration job's device and dtype (JSON)."""
    return json.dumps({"device": DEVICE, "dtype": DTYPE}, sort_keys=True)


def flopcheck_spec(wildcards):
    """One dict per flop-check job (JSON): the model, knobs and inputs of a measure job, no timing protocol."""
    return json.dumps({
        "model": MODEL, "device": DEVICE, "dtype": DTYPE, "weights": config["weights"], "seed": config["seed"],
        "variant": wildcards.variant, **FLOPCHECK_VARIANTS[wildcards.variant],
        "image": wildcards.image, "image_path": f"inputs/images/{wildcards.image}.png",
        "prompt": wildcards.prompt, "prompt_path": f"inputs/prompts/{wildcards.prompt}.json",
    }, sort_keys=True)


def all_flopchecks(wildcards):
    return [f"results/{RUN}/flopcheck/{image}__{FIRST_PROMPT}__{variant}.json"
            for image in config["images"] for variant in FLOPCHECK_VARIANTS]


def findings_components(wildcards):
    """The profiler breakdown, when any variant is profiled (eager decode); none otherwise."""
    return ["results/e1_attention_ffn_breakdown.json"] if PROFILE_IDS else []


def all_parquets(wildcards):
    return [f"results/{RUN}/measure/{cid}.parquet" for cid in CONFIG_IDS]


def figure(name):
    """figures/<name>.png as an output shown in `snakemake --report`, captioned by workflow/report/<name>.rst."""
    return report(f"figures/{name}.png", caption=str(REPO / "workflow" / "report" / f"{name}.rst"), category="Figures")
