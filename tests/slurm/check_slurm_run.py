"""Checks after tests/slurm/run_slurm_test.sh: the cluster run went through SLURM, and wrote what a local run writes.

1. Through SLURM: every job snakemake ran (all but the target rule `all` and the local rules spec and prompt,
   which write planned records inside snakemake) was submitted with sbatch (the
   plugin's "submitted with SLURM jobid" line), each SLURM job is known to slurmctld (`scontrol show job`
   keeps finished jobs for MinJobAge; its submit RPC is in the slurmctld log), ran to COMPLETED on the
   node, and carried the profile's resources: the GPU rules (measure, profile, calibrate, flop_check, fidelity) asked for and were
   allocated the fake GPU (TresPerNode=gres:gpu:1, JOB_GRES=gpu:1) and 16000 MB, the CPU rules no GPU;
   each job has its plugin log under .snakemake/slurm_logs. Snakemake submitted the measure jobs together
   (profiles/default's gpu=1 cap did not serialise them) and SLURM ran them one at a time on the one GPU.
2. Same outputs as the local run of the same grid. "Same" means, and only means:
   - the same files under inputs/, results/ and figures/ (logs/ and .snakemake/ are bookkeeping);
   - inputs/ byte for byte (synthetic image and prompt: deterministic);
   - every JSON file: the same keys and list lengths at every level, and equal values everywhere except
     floating-point numbers, which are timings or ratios of timings (only their presence and finiteness
     is compared): config ids, counts (runs, tokens, ViT crops, kernels), flags such as
     tokens_identical_across_runs, model/device/dtype/weights/versions must match;
   - every Parquet file: the same columns, dtypes and number of rows, and equal values in every column
     that is not floating point (config id, run, stage, decode step, layer, expert, kernel counts, and the
     tokens each expert received, which follow from the generated token ids);
   - profiler traces (.json.gz): the same multiset of named ranges (stage and component annotations);
   - figures: valid PNG images of the same pixel size (the bars are timings);
   - what is derived from timings by thresholds or ranking is compared for structure only: in
     e1_findings.json the same questions and findings with the same criteria (answers, verdicts and
     evidence follow the timings), in e1_findings.md the same headings, in e1_flops_vs_latency.json
     everything but the inversions (stage pairs ordered by measured time) and each point's bound (compute
     or memory, decided by the measured calibration); in every JSON the host load around the timed runs
     and the flags it and the timing noise decide (host_load, flags, flagged) are left out.
Exit status 0 when everything holds; otherwise every failed check is printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

GPU_RULES = {"measure", "profile", "calibrate", "flop_check", "fidelity"}  # rules profiles/slurm gives one GPU each
GPU_MEM_MB = 16000
COMPARED_DIRS = ("inputs", "results", "figures")

failures: list[str] = []
passed = 0


def check(ok: bool, message: str) -> bool:
    global passed
    if ok:
        passed += 1
    else:
        failures.append(message)
    return ok


# --- 1. through SLURM --------------------------------------------------------------------------------

def parse_scontrol(text: str) -> dict[str, dict[str, str]]:
    """`scontrol show job --details --oneliner`: one job a line, KEY=VALUE fields separated by spaces (the
    plugin's Comment has none). Returns {job id: fields}."""
    jobs = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w[\w:/]*)=(\S*)", line))
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def submitted_jobs(snakemake_log: str) -> dict[str, str]:
    """{SLURM job id: rule} from snakemake's output: rule blocks, then 'Job N has been submitted ...'."""
    rule_of_job = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", snakemake_log):
        m = re.search(r"^(?:local)?rule (\w+):.*?\n\s+jobid: (\d+)", block, re.S | re.M)
        if m:
            rule_of_job[m.group(2)] = m.group(1)
    out = {}
    for job, slurm_id in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", snakemake_log):
        out[slurm_id] = rule_of_job.get(job, "?")
    return out


def job_stats(snakemake_log: str) -> Counter:
    m = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal\s+\d+", snakemake_log, re.S)
    assert m, "no 'Job stats' table in the snakemake output"
    return Counter({name: int(n) for name, n in (line.split() for line in m.group(1).splitlines())})


def check_slurm(cluster: Path, jobs_file: Path, ctld_log: Path, snakemake_log: Path) -> None:
    log = snakemake_log.read_text()
    planned = job_stats(log)
    planned.pop("all", None)  # the target rule has no command: snakemake finishes it itself
    for rule in set(re.findall(r"^localrule (\w+):", log, re.M)):  # spec and prompt run inside snakemake
        planned.pop(rule, None)
    submitted = submitted_jobs(log)
    check(Counter(submitted.values()) == planned,
          f"jobs submitted with sbatch per rule {dict(Counter(submitted.values()))} != planned {dict(planned)}")
    check(GPU_RULES <= set(submitted.values()), f"no GPU rule among the submitted jobs: {submitted}")

    jobs = parse_scontrol(jobs_file.read_text())
    ctld = ctld_log.read_text()
    for slurm_id, rule in sorted(submitted.items(), key=lambda kv: int(kv[0])):
        where = f"SLURM job {slurm_id} (rule {rule})"
        check(f"_slurm_rpc_submit_batch_job: JobId={slurm_id} " in ctld, f"{where}: no submission in the slurmctld log")
        job = jobs.get(slurm_id)
        if not check(job is not None, f"{where}: unknown to scontrol show job"):
            continue
        check(job.get("JobState") == "COMPLETED", f"{where}: JobState={job.get('JobState')}")
        comment = job.get("Comment", "")
        check(comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_"), f"{where}: Comment={comment}")
        # asked for: TresPerNode; allocated: JOB_GRES (scontrol --details) and TRES (cpu, mem)
        gres, tres = job.get("JOB_GRES", ""), job.get("TRES", "")
        mem = re.search(r"mem=(\d+)M", tres)
        if rule in GPU_RULES:
            check(job.get("TresPerNode") == "gres:gpu:1", f"{where}: asked for TresPerNode={job.get('TresPerNode')}")
            check(gres == "gpu:1", f"{where}: GPU rule not given one GPU: JOB_GRES={gres}")
            check(mem is not None and int(mem.group(1)) == GPU_MEM_MB, f"{where}: TRES={tres}, want mem={GPU_MEM_MB}M")
        else:
            check(gres in ("(null)", ""), f"{where}: a CPU rule was given {gres}")
        logs = list((cluster / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(f"{slurm_id}.log"))
        check(len(logs) == 1, f"{where}: no plugin log .snakemake/slurm_logs/rule_{rule}/**/{slurm_id}.log")
    check_gpu_scheduling({i: jobs[i] for i, rule in submitted.items() if rule in GPU_RULES and i in jobs},
                         {i for i, rule in submitted.items() if rule == "measure"})


def check_gpu_scheduling(gpu_jobs: dict[str, dict[str, str]], measure_jobs: set[str]) -> None:
    """Snakemake submitted the measure jobs together (they become ready at the same moment, after the
    inputs; profiles/default's global gpu=1 cap did not serialise them), and SLURM ran all GPU jobs one at a
    time: the node has one GPU and each job holds it."""
    together = {i: j for i, j in gpu_jobs.items() if i in measure_jobs}
    if len(together) < 2:
        check(False, f"need at least two measure jobs to check their scheduling, got {sorted(together)}")
        return
    first_end = min(j["EndTime"] for j in together.values())
    late = sorted(i for i, j in together.items() if j["SubmitTime"] >= first_end)
    check(not late, f"measure jobs {late} were submitted only after the first measure job ended ({first_end}): "
                    "snakemake serialised them (is the gpu resource scoped local in profiles/slurm?)")
    spans = sorted((j["StartTime"], j["EndTime"], i) for i, j in gpu_jobs.items())
    for (s0, e0, i0), (s1, _, i1) in zip(spans, spans[1:]):
        check(s1 >= e0, f"GPU jobs {i0} and {i1} overlapped on the one GPU ({s0}-{e0} and from {s1})")


# --- 2. same outputs ---------------------------------------------------------------------------------

def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for d in COMPARED_DIRS if (root / d).is_dir()
            for p in (root / d).rglob("*") if p.is_file()}


def compare_json(a, b, where: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool) and math.isfinite(a) == math.isfinite(b)
        check(ok, f"{where}: {a!r} vs {b!r}")
    elif isinstance(a, dict) and isinstance(b, dict):
        if check(a.keys() == b.keys(), f"{where}: keys differ: {sorted(a.keys() ^ b.keys())}"):
            for k in a:
                compare_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if check(len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"):
            for i, (x, y) in enumerate(zip(a, b)):
                compare_json(x, y, f"{where}[{i}]")
    else:
        check(type(a) is type(b) and a == b, f"{where}: {a!r} (cluster) vs {b!r} (local)")


def compare_parquet(a: Path, b: Path, where: str) -> None:
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    if not check(list(x.columns) == list(y.columns) and list(map(str, x.dtypes)) == list(map(str, y.dtypes))
                 and len(x) == len(y), f"{where}: columns/dtypes/rows differ: {x.dtypes.to_dict()} "
                                       f"({len(x)} rows) vs {y.dtypes.to_dict()} ({len(y)} rows)"):
        return
    exact = [c for c in x.columns if not pd.api.types.is_float_dtype(x[c])]
    for c in exact:
        check(x[c].reset_index(drop=True).equals(y[c].reset_index(drop=True)), f"{where}: column {c!r} differs")
    for c in set(x.columns) - set(exact):
        check(x[c].notna().equals(y[c].notna()), f"{where}: missing values in column {c!r} differ")


def trace_ranges(path: Path) -> Counter:
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    return Counter(e["name"] for e in events if e.get("cat") == "user_annotation")


def png_size(path: Path) -> tuple[int, int] | None:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def compare_findings(a: dict, b: dict, where: str) -> None:
    """Structure only: the same questions, the same expected findings and criteria, one verdict each."""
    check(a.keys() == b.keys() and a["questions"].keys() == b["questions"].keys(), f"{where}: questions differ")
    crit = [[(f["finding"], f["criterion"]) for f in x["expected_findings"]] for x in (a, b)]
    check(crit[0] == crit[1], f"{where}: expected findings or criteria differ")
    verdicts = {"holds", "does not hold", "mixed", "not measured"}
    check(all(f["verdict"] in verdicts for x in (a, b) for f in x["expected_findings"]), f"{where}: bad verdict")


# e1_flops_vs_latency.json: decided by measured numbers (timings, the device calibration), not by the run's work
TIMING_DERIVED = {"inversions", "bound"}
# Every JSON: what the host did around the timed runs, and the flags decided by timing noise or host load.
HOST_DERIVED = {"host_load", "flags", "flagged"}


def drop_keys(data, keys: set[str]):
    if isinstance(data, dict):
        return {k: drop_keys(v, keys) for k, v in data.items() if k not in keys}
    if isinstance(data, list):
        return [drop_keys(v, keys) for v in data]
    return data


def headings(path: Path) -> list[str]:
    return [line.split(":")[0] for line in path.read_text().splitlines() if line.startswith("#")]


def compare_outputs(cluster: Path, local: Path) -> int:
    fa, fb = files(cluster), files(local)
    check(fa == fb, f"files only on the cluster: {sorted(fa - fb)}; only local: {sorted(fb - fa)}")
    check(any(f.endswith(".parquet") and "/measure/" in f for f in fa), "no measurement in the cluster run")
    for rel in sorted(fa & fb):
        a, b = cluster / rel, local / rel
        if rel.startswith("inputs/"):
            check(a.read_bytes() == b.read_bytes(), f"{rel}: inputs differ")
        elif rel.endswith("e1_findings.json"):
            compare_findings(json.loads(a.read_text()), json.loads(b.read_text()), rel)
        elif rel.endswith("e1_findings.md"):
            check(headings(a) == headings(b) and len(headings(a)) > 0, f"{rel}: headings differ")
        elif rel.endswith("e1_flops_vs_latency.json"):
            compare_json(*(drop_keys(json.loads(f.read_text()), TIMING_DERIVED | HOST_DERIVED) for f in (a, b)), rel)
        elif rel.endswith(".json"):
            compare_json(*(drop_keys(json.loads(f.read_text()), HOST_DERIVED) for f in (a, b)), rel)
        elif rel.endswith(".parquet"):
            compare_parquet(a, b, rel)
        elif rel.endswith(".trace.json.gz"):
            ra, rb = trace_ranges(a), trace_ranges(b)
            check(ra == rb and len(ra) > 0, f"{rel}: named ranges differ: {sorted((ra - rb) + (rb - ra))[:10]}")
        elif rel.endswith(".png"):
            sa, sb = png_size(a), png_size(b)
            check(sa is not None and sa == sb, f"{rel}: PNG sizes {sa} vs {sb}")
        else:
            check(False, f"{rel}: no comparison defined for this kind of file")
    return len(fa & fb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", type=Path, required=True, help="working directory of the cluster run")
    ap.add_argument("--local", type=Path, required=True, help="working directory of the local run")
    ap.add_argument("--jobs", type=Path, required=True, help="`scontrol show job --details --oneliner` saved after the run")
    ap.add_argument("--ctld-log", type=Path, required=True)
    ap.add_argument("--snakemake-log", type=Path, required=True, help="output of the cluster run")
    args = ap.parse_args(argv)
    check_slurm(args.cluster, args.jobs, args.ctld_log, args.snakemake_log)
    n = compare_outputs(args.cluster, args.local)
    if failures:
        print(f"{len(failures)} check(s) failed:", *failures, sep="\n  ", file=sys.stderr)
    else:
        print(f"every job went through sbatch with the profile's resources; {n} output files match the local run")
    print(f"slurm-checks: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
