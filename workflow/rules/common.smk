# Shared helpers: how rules run e1, the run's identity, the grid, job specs, code dependencies.
# Planning imports this checkout's e1 (torch-free modules only): the knob table, the spec dataclasses, the
# architecture, Molmo's token counts and the prompt records come from the package, written once.
import ast
import os
import re
import sys

SRC = REPO / "src"
sys.path.insert(0, str(SRC))
import e1  # noqa: E402

if Path(e1.__file__).resolve().parent.parent != SRC.resolve():
    raise WorkflowError(f"planning imported e1 from {Path(e1.__file__).parent}, not from this checkout's {SRC}")

from e1 import knobs  # noqa: E402
from e1.inputs.images import parse_size  # noqa: E402
from e1.inputs.prompts import make_prompt, resolve_tokenizer  # noqa: E402
from e1.jobs import nvsmi  # noqa: E402
from e1.jobs import spec as jobspec  # noqa: E402
from e1.jobs.io import write_json  # noqa: E402
from e1.model.arch import load_arch  # noqa: E402
from e1.vlm.families import FAMILIES, layout_for, prefill_tokens  # noqa: E402


def e1_command():
    """How every rule runs the package's CLI: workflow/scripts/e1-job with this checkout's src/ first on
    PYTHONPATH (the job refuses any other e1) and the interpreter that runs snakemake; under `--sdm conda`
    the python of the rule's activated environment (envs/*.yaml do not install e1)."""
    under_conda = any(m.name == "CONDA" for m in workflow.deployment_settings.deployment_method)
    python = "python" if under_conda else sys.executable
    return f'bash "{REPO / "workflow" / "scripts" / "e1-job"}" "{python}" "{SRC}"'


E1 = e1_command()  # usage in a rule: "{E1} {log} <command> <args>"


def detect_device():
    """cuda if nvidia-smi lists a GPU here (no torch import), else cpu."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return "cpu"
    return "cuda" if nvsmi.list_gpus() else "cpu"


DEVICE = detect_device() if config["device"] == "auto" else config["device"]
ON_GPU = DEVICE.startswith("cuda")
MODEL = config["model"] if config["model"] != "auto" else ("molmoe-1b" if ON_GPU else "molmoe-1b-tiny")
DTYPE = config["dtype"] if config["dtype"] != "auto" else ("bfloat16" if ON_GPU else "float32")
def run_of(model):
    """results/<model>_<device>_<dtype>/: CPU and GPU results, and models, never mix."""
    return f"{model}_{DEVICE.replace(':', '')}_{DTYPE}"


RUN = run_of(MODEL)
try:
    ARCH = load_arch(MODEL)
    # The cross-model study (rule cross_model): every model of `models` at the cross_model regime.
    FULL_MODELS = ["molmoe-1b", "llava-1.5-7b", "qwen2.5-vl-7b", "qwen3-vl-30b-a3b"]
    MODELS = {"auto": [m if ON_GPU else f"{m}-tiny" for m in FULL_MODELS], "model": [MODEL]}.get(
        config.get("models", "auto"), config.get("models"))
    ARCHS = {m: load_arch(m) for m in dict.fromkeys([MODEL, *MODELS])}
except ValueError as e:
    raise WorkflowError(f"config: {e}") from None
MODEL_OF_RUN = {run_of(m): m for m in ARCHS}

# --- the grid ------------------------------------------------------------------------------------------
# Sweep axes (each one value or a list; e1/knobs.py): every combination is a variant, carried into every
# artifact. Impossible combinations are left out and named; a run where none is possible is an error.
try:
    GRIDS = {m: knobs.grid(config, a, "cuda" if ON_GPU else "cpu", DTYPE) for m, a in ARCHS.items()}
except ValueError as e:
    raise WorkflowError(f"config: {e}") from None
VARIANTS_OF = {m: g[0] for m, g in GRIDS.items()}
VARIANTS = VARIANTS_OF[MODEL]
LEFT_OUT = sorted({note for _variants, notes in GRIDS.values() for note in notes})
if LEFT_OUT:
    print(f"e1: {len(LEFT_OUT)} variant(s) left out:\n  " + "\n  ".join(LEFT_OUT), file=sys.stderr)

unknown = [p for p in config.get("select_prompts") or [] if p not in config["prompts"]]
if unknown:
    raise WorkflowError(f"config: select_prompts names {unknown}, which are not in prompts "
                        f"({', '.join(config['prompts'])})")
PROMPTS = {name: p for name, p in config["prompts"].items()
           if not config.get("select_prompts") or name in config["select_prompts"]}
# The prompt records (token ids), made while planning: a text edit that leaves the ids equal reruns nothing.
try:
    TOKENIZER = resolve_tokenizer(config.get("tokenizer", "auto"), config["weights"])
    PROMPT_RECORDS = {m: {name: make_prompt(a, name, p["tokens"], p.get("text"), TOKENIZER if m == MODEL else None,
                                            config["seed"]) for name, p in PROMPTS.items()} for m, a in ARCHS.items()}
except ValueError as e:
    raise WorkflowError(f"config: {e}") from None

CONFIGS = [{"run": RUN, "model": MODEL, "image": image, "prompt": prompt, "decode": n, "variant": variant}
           for image in config["images"] for prompt in PROMPTS for n in config["decode_tokens"] for variant in VARIANTS]
CROSS = config.get("cross_model") or {"prompt": next(iter(config["prompts"])), "decode_tokens": 64}
CROSS_CONFIGS = [{"run": run_of(m), "model": m, "image": image, "prompt": CROSS["prompt"],
                  "decode": CROSS["decode_tokens"], "variant": v}
                 for m in MODELS for image in config["images"] for v in VARIANTS_OF[m]] if CROSS["prompt"] in PROMPTS else []


# rule all (and the findings) take the cross-model study when its regime is part of the run's grid
CROSS_IN_ALL = bool(CROSS_CONFIGS) and CROSS["decode_tokens"] in config["decode_tokens"]
if not CROSS_IN_ALL:
    print(f"e1: rule all leaves out the cross-model study: its regime (prompt {CROSS['prompt']!r}, N = "
          f"{CROSS['decode_tokens']}) is not in this run's prompts and decode_tokens; target "
          "figures/e1_cross_model.png to run it", file=sys.stderr)


def cross_summaries(wildcards):
    """The measure summaries of the cross-model study (rule cross_model's input)."""
    if not CROSS_CONFIGS:
        raise WorkflowError(f"config: cross_model.prompt {CROSS['prompt']!r} is not among the run's prompts "
                            f"({', '.join(PROMPTS)}); select it (select_prompts) or name another")
    return per_config(rules.measure.output.summary, CROSS_CONFIGS)
CONFIG = "{image}__{prompt}__n{decode}__{variant}"  # one configuration's file stem
# Every configuration is profiled; graph replays show no module ranges, so their components come from
# kernel names learned on the run's eager profiles (e1/profile/breakdown.py).
PROFILED = CONFIGS


def check_contexts():
    """Refuse, before any job runs, a configuration whose sequence does not fit its LLM's context."""
    bad = {}
    for c in [*CONFIGS, *FIDELITY, *CROSS_CONFIGS]:
        m = c.get("model", MODEL)
        w, h = parse_size(c["image"])
        arch = ARCHS[m].with_knobs(max_crops=VARIANTS_OF[m][c["variant"]]["max_crops"])
        text = PROMPT_RECORDS[m][c["prompt"]]["text_tokens"]
        prefill = prefill_tokens(arch, w, h, text)
        image, bos = layout_for(arch, w, h).image_tokens, prefill - text - layout_for(arch, w, h).image_tokens
        total = prefill + c["decode"] - 1
        if total > arch.llm["max_position_embeddings"]:
            bad.setdefault(m, []).append(f"{CONFIG.format(**c)}: {total} tokens ({bos} BOS + {image} image + {text} "
                                         f"text + {c['decode'] - 1} decoded)")
    if bad:
        raise WorkflowError("\n".join(
            f"{len(b)} configuration(s) exceed the {ARCHS[m].llm['max_position_embeddings']}-token context of {m}:\n  "
            + "\n  ".join(b[:10]) + ("\n  ..." if len(b) > 10 else "") for m, b in bad.items())
            + "\nreduce images (or max_crops), prompts.<name>.tokens or decode_tokens")


wildcard_constraints:
    image=r"[1-9][0-9]*x[1-9][0-9]*",
    prompt=r"[A-Za-z0-9-]+",
    decode=r"[0-9]+",
    variant=r"[a-z0-9_]+\.[a-z0-9_]+\.(eager|cuda_graph)\.k[0-9]+\.c[0-9]+\.(learned|balanced)",
    kind="|".join(jobspec.KINDS),
    run="|".join(re.escape(r) for r in MODEL_OF_RUN),
    model="|".join(re.escape(m) for m in ARCHS),


def per_config(pattern, configs):
    """`pattern` (a rule's output, with {image} {prompt} {decode} {variant}) for each configuration."""
    return [pattern.format(**c) for c in configs]


# --- code dependencies ---------------------------------------------------------------------------------

def code(*entries, arch=True):
    """The package modules a rule's command runs: the entry modules and every e1 module they import,
    transitively (read from their import statements, also those inside functions, not those under
    `if TYPE_CHECKING:`; nothing is imported here), plus the model's architecture file when e1.model.arch is
    among them. Editing any of them reruns the rule, and only what follows it. The CLI (cli.py) and
    __main__.py only dispatch and are left out: editing them reruns nothing."""
    src = SRC / "e1"
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
    if arch and src / "model" / "arch.py" in seen:
        seen.add(src / "model" / "archs" / f"{MODEL}.json")
    return sorted(str(f) for f in seen)


# --- job specs (rule spec writes them; e1/jobs/spec.py defines their fields) ----------------------------
SPEC = "results/{run}/specs/{kind}/{stem}.json"
FIRST_PROMPT = next(iter(PROMPTS))  # the flop check runs once per image and variant, with the first prompt
# FlopCounterMode sees eager decode only (a graph replay hides its ops): one check per eager-decode variant.
FLOPCHECK_VARIANTS = {knobs.variant_name(k): k for k in ({**v, "backend": "eager"} for v in VARIANTS.values())}


# The generate() check runs eagerly: one per image and eager variant, first prompt, fidelity.decode_tokens.
FIDELITY = [{"run": RUN, "image": image, "prompt": FIRST_PROMPT, "decode": config["fidelity"]["decode_tokens"], "variant": v}
            for image in config["images"] for v, k in VARIANTS.items() if k["backend"] == "eager"]


check_contexts()


def spec_input(kind, stem, run=RUN):
    """The spec file of a job of `kind` (a rule's input); run="{run}" leaves the run a wildcard."""
    return SPEC.replace("{kind}", kind).replace("{stem}", stem).replace("{run}", run)


def model_files(model):
    """The model-specific inputs of a job of `model`: its family's adapter modules (and what they import) and its
    architecture file, so editing one model's adapter reruns only that model's jobs."""
    arch = ARCHS[model]
    return [*code(*FAMILIES[arch.family].code, arch=False), str(SRC / "e1" / "model" / "archs" / f"{arch.name}.json")]


def model_code(wildcards):
    """model_files of the model of run {run}."""
    return model_files(MODEL_OF_RUN[wildcards.run])


def prompt_file(wildcards):
    """The prompt record of {prompt} for the model of run {run}."""
    return rules.prompt.output[0].format(model=MODEL_OF_RUN[wildcards.run], prompt=wildcards.prompt)


def _model_job(stem, image, prompt, variant, variants=None, model=MODEL):
    variants = variants if variants is not None else VARIANTS_OF[model]
    return dict(id=stem, model=model, device=DEVICE, dtype=DTYPE,
                weights=config["weights"] if model == MODEL else "random", seed=config["seed"],
                variant=variant, knobs=variants[variant], image=image,
                image_path=rules.image.output[0].format(image=image), prompt=prompt,
                prompt_path=rules.prompt.output[0].format(model=model, prompt=prompt))


def job_spec(wildcards):
    """The spec of the job whose spec file is {kind}/{stem}.json: one dict per job, all it needs to run."""
    kind, stem, model = wildcards.kind, wildcards.stem, MODEL_OF_RUN[wildcards.run]
    if kind == "calibrate":
        return jobspec.to_dict(jobspec.CalibrateJob(device=DEVICE, dtype=DTYPE))
    parts = stem.split("__")
    if kind == "flop_check":
        image, prompt, variant = parts
        return jobspec.to_dict(jobspec.FlopCheckJob(**_model_job(stem, image, prompt, variant, FLOPCHECK_VARIANTS)))
    image, prompt, decode, variant = parts
    base = _model_job(stem, image, prompt, variant, model=model)
    if kind == "measure":
        return jobspec.to_dict(jobspec.MeasureJob(**base, decode_tokens=int(decode[1:]),
                                                  warmup=config["protocol"]["warmup"], timed=config["protocol"]["timed"],
                                                  energy=dict(config["energy"])))
    if kind == "fidelity":
        return jobspec.to_dict(jobspec.FidelityJob(**base, decode_tokens=int(decode[1:]),
                                                   pairs=config["fidelity"]["pairs"]))
    p = config["profile"]
    return jobspec.to_dict(jobspec.ProfileJob(**base, decode_tokens=int(decode[1:]), warmup=p["warmup"],
                                              runs=p["runs"], max_decode_steps=p["max_decode_steps"]))


def prompt_record(wildcards):
    return PROMPT_RECORDS[wildcards.model][wildcards.prompt]


def reported(path, caption, category):
    """`path`, shown in `snakemake --report` once it exists: a report after any run holds what that run made
    (the Snakefile names what is not built yet)."""
    if not Path(path).exists():
        return path
    return report(path, caption=str(REPO / "workflow" / "report" / caption), category=category)


def figure(name):
    """figures/<name>.png as a rule output, captioned in the report by workflow/report/<name>.rst."""
    return reported(f"figures/{name}.png", f"{name}.rst", "Figures")
