"""What each job is told to do: one dataclass per kind of job, written to a file by the workflow's `spec`
rule and read back by the job. The fields are the only definition of a job's spec: Snakemake builds it from
them (workflow/rules/common.smk) and a job refuses a file with a missing, unknown or ill-typed key.
No torch import (the rules import this module while they plan).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from e1.jobs.io import ArtifactError, Record

SPEC_RULE = "spec"  # the workflow rule that writes every spec file


@dataclass(frozen=True)
class ModelJob:
    """A job that builds the run's model with one variant's knobs and runs it on one image and prompt."""

    id: str  # <image>__<prompt>[__n<N>]__<variant>
    model: str
    device: str
    dtype: str
    weights: str  # "random" or a local checkpoint directory
    seed: int
    variant: str
    knobs: dict  # every knob of e1.knobs, resolved
    image: str  # WIDTHxHEIGHT
    image_path: str
    prompt: str  # the prompt's name in config.yaml
    prompt_path: str


@dataclass(frozen=True)
class FlopCheckJob(ModelJob):
    """FlopCounterMode on each stage call once (rule flop_check)."""


@dataclass(frozen=True)
class MeasureJob(ModelJob):
    """Warm-up and timed runs of one configuration (rule measure)."""

    decode_tokens: int  # N new tokens = 1 prefill + N-1 decode steps
    warmup: int
    timed: int
    energy: dict  # repeats (0: not measured), min_periods (e1.energy.windows)


@dataclass(frozen=True)
class ProfileJob(ModelJob):
    """torch.profiler runs of one configuration (rule profile)."""

    decode_tokens: int
    warmup: int
    runs: int
    max_decode_steps: int


@dataclass(frozen=True)
class FidelityJob(ModelJob):
    """e1's loop against transformers' generate() on one configuration (rule fidelity)."""

    decode_tokens: int
    pairs: int


@dataclass(frozen=True)
class CalibrateJob:
    """The device's measured ceilings (rule calibrate)."""

    device: str
    dtype: str


KINDS = {"measure": MeasureJob, "profile": ProfileJob, "flop_check": FlopCheckJob, "fidelity": FidelityJob,
         "calibrate": CalibrateJob}
_TYPES = {"str": str, "int": int, "dict": dict}
S = TypeVar("S")


def to_dict(spec: Any) -> dict[str, Any]:
    return asdict(spec)


def load(path: str | Path, kind: type[S]) -> S:
    """Read a spec file of `kind`; errors name the file, the keys and what is allowed."""
    rec = Record.load(path, SPEC_RULE)
    names = [f.name for f in fields(kind)]
    missing = [k for k in names if k not in rec.data]
    unknown = sorted(set(rec.data) - set(names))
    if missing or unknown:
        raise ArtifactError(f"{path}: not a {kind.__name__} spec: missing keys {missing}, unknown keys {unknown}; "
                            f"required: {names}. It is written by rule {SPEC_RULE}: delete it and run snakemake "
                            "again")
    for f in fields(kind):
        want = _TYPES[str(f.type).split("[")[0]]
        value = rec.data[f.name]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise rec[f.name].fail(f"is {value!r:.80}, expected {want.__name__}")
    return kind(**rec.data)
