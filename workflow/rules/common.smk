# Shared helpers: how rules run e1, the run's identity, the grid, job specs, code dependencies.
# Planning imports this checkout's e1 (torch-free modules only): the knob table, the spec dataclasses, the
# architecture, Molmo's token counts and the prompt records come from the package, written once.
import ast
import os
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
from e1.model.preprocess import layout_for  # noqa: E402


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
RUN = f"{MODEL}_{DEVICE.replace(':', '')}_{DTYPE}"  # results/<RUN>/: CPU and GPU results never mix
ARCH = load_arch(MODEL)

# --- the grid ------------------------------------------------------------------------------------------
# Sweep axes (each one value or a list; e1/knobs.py): every combination is a variant, carried into every
# artifact. Impossible combinations are left out and named; a run where none is possible is an error.
try:
    VARIANTS, LEFT_OUT = knobs.grid(config, ARCH, "cuda" if ON_GPU else "cpu", DTYPE)
except ValueError as e:
    raise WorkflowError(f"config: {e}") from None
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
    PROMPT_RECORDS = {name: make_prompt(ARCH, name, p["tokens"], p.get("text"), TOKENIZER, config["seed"])
                      for name, p in PROMPTS.items()}
except ValueError as e:
    raise WorkflowError(f"config: {e}") from None

CONFIGS = [{"image": image, "prompt": prompt, "decode": n, "variant": variant}
           for image in config["images"] for prompt in PROMPTS for n in config["decode_tokens"] for variant in VARIANTS]
CONFIG = "{image}__{prompt}__n{decode}__{variant}"  # one configuration's file stem
# Every configuration is profiled; graph replays show no module ranges, so their components come from
# kernel names learned on the run's eager profiles (e1/profile/breakdown.py).
PROFILED = CONFIGS


def check_contexts():
    """Refuse, before any job runs, a configuration whose sequence does not fit the LLM's context."""
    limit = ARCH.llm["max_position_embeddings"]
    bad = []
    for c in [*CONFIGS, *FIDELITY]:
        w, h = parse_size(c["image"])
        crops = VARIANTS[c["variant"]]["max_crops"]
        image_tokens = layout_for(ARCH.with_knobs(max_crops=crops), w, h).image_tokens
        total = 1 + image_tokens + PROMPT_RECORDS[c["prompt"]]["text_tokens"] + c["decode"] - 1
        if total > limit:
            bad.append(f"{CONFIG.format(**c)}: {total} tokens (1 BOS + {image_tokens} image + "
                       f"{PROMPT_RECORDS[c['prompt']]['text_tokens']} text + {c['decode'] - 1} decoded)")
    if bad:
        raise WorkflowError(f"{len(bad)} configuration(s) exceed the {limit}-token context of {MODEL}:\n  "
                            + "\n  ".join(bad[:10]) + ("\n  ..." if len(bad) > 10 else "")
                            + "\nreduce images (or max_crops), prompts.<name>.tokens or decode_tokens")


wildcard_constraints:
    image=r"[1-9][0-9]*x[1-9][0-9]*",
    prompt=r"[A-Za-z0-9-]+",
    decode=r"[0-9]+",
    variant=r"[a-z0-9_]+\.[a-z0-9_]+\.(eager|cuda_graph)\.k[0-9]+\.c[0-9]+\.(learned|balanced)",
    kind="|".join(jobspec.KINDS),


def per_config(pattern, configs):
    """`pattern` (a rule's output, with {image} {prompt} {decode} {variant}) for each configuration."""
    return [pattern.format(**c) for c in configs]


# --- code dependencies ---------------------------------------------------------------------------------

def code(*entries):
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
    if src / "model" / "arch.py" in seen:
        seen.add(src / "model" / "archs" / f"{MODEL}.json")
    return sorted(str(f) for f in seen)


# --- job specs (rule spec writes them; e1/jobs/spec.py defines their fields) ----------------------------
SPEC = f"results/{RUN}/specs/{{kind}}/{{stem}}.json"
FIRST_PROMPT = next(iter(PROMPTS))  # the flop check runs once per image and variant, with the first prompt
# FlopCounterMode sees eager decode only (a graph replay hides its ops): one check per eager-decode variant.
FLOPCHECK_VARIANTS = {knobs.variant_name(k): k for k in ({**v, "backend": "eager"} for v in VARIANTS.values())}


# The generate() check runs eagerly: one per image and eager variant, first prompt, fidelity.decode_tokens.
FIDELITY = [{"image": image, "prompt": FIRST_PROMPT, "decode": config["fidelity"]["decode_tokens"], "variant": v}
            for image in config["images"] for v, k in VARIANTS.items() if k["backend"] == "eager"]


check_contexts()


def spec_input(kind, stem):
    """The spec file of a job of `kind` (a rule's input)."""
    return SPEC.replace("{kind}", kind).replace("{stem}", stem)


def _model_job(stem, image, prompt, variant, variants=VARIANTS):
    return dict(id=stem, model=MODEL, device=DEVICE, dtype=DTYPE, weights=config["weights"], seed=config["seed"],
                variant=variant, knobs=variants[variant], image=image,
                image_path=rules.image.output[0].format(image=image), prompt=prompt,
                prompt_path=rules.prompt.output[0].format(prompt=prompt))


def job_spec(wildcards):
    """The spec of the job whose spec file is {kind}/{stem}.json: one dict per job, all it needs to run."""
    kind, stem = wildcards.kind, wildcards.stem
    if kind == "calibrate":
        return jobspec.to_dict(jobspec.CalibrateJob(device=DEVICE, dtype=DTYPE))
    parts = stem.split("__")
    if kind == "flop_check":
        image, prompt, variant = parts
        return jobspec.to_dict(jobspec.FlopCheckJob(**_model_job(stem, image, prompt, variant, FLOPCHECK_VARIANTS)))
    image, prompt, decode, variant = parts
    base = _model_job(stem, image, prompt, variant)
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
    return PROMPT_RECORDS[wildcards.prompt]


def reported(path, caption, category):
    """`path`, shown in `snakemake --report` once it exists: a report after any run holds what that run made
    (the Snakefile names what is not built yet)."""
    if not Path(path).exists():
        return path
    return report(path, caption=str(REPO / "workflow" / "report" / caption), category=category)


def figure(name):
    """figures/<name>.png as a rule output, captioned in the report by workflow/report/<name>.rst."""
    return reported(f"figures/{name}.png", f"{name}.rst", "Figures")
