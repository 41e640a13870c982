"""Rule stage_energy: every configuration's energy per stage, from the stage latency table's rows (each
measure job's energy phase, e1.energy.stages), into results/e1_stage_energy.json. No torch import."""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Any

from e1.jobs.io import Record, write_json
from e1.latency.table import read_latency
from e1.names import STAGES

ENERGY_RULE = "stage_energy"
CONVENTION = ("J per request = vision encoder + projector + prefill + (N-1) x decode step, each stage's J per call "
              "the median over its windows; per generated token = per request / N; net = above the idle power of "
              "an idle window of the same length right after each stage window, gross = the idle floor included; "
              "decode step = one step at the request's mean context (T + (N-1)//2 cached positions); "
              "power = gross J per call / the stage's median timed latency")


def config_energy(row: dict[str, Any]) -> dict[str, Any]:
    """One configuration's energy entry (measured or not, and why)."""
    e = row.get("energy") or {"measured": False, "reason": "not recorded by its measure job"}
    out = {k: row[k] for k in ("id", "variant", "image", "prompt", "decode_tokens", "knobs")}
    out.update(measured=bool(e.get("measured")), reason=e.get("reason"))
    if not out["measured"]:
        return out
    n = row["decode_tokens"]
    stages = {}
    for s, v in e["stages"].items():
        times = n - 1 if s == "decode" else 1  # calls of this stage in one request
        ms = row["decode_step"]["median_ms"] if s == "decode" else row["stages"][s]["median_ms"]
        stages[s] = {"calls_per_window": v["calls"], "window_s": v["window_s"], "idle_w": v["idle_w"],
                     "gross_j_per_call": v["gross_j_per_call"], "net_j_per_call": v["net_j_per_call"],
                     "per_request_gross_j": times * v["gross_j_per_call"]["median"],
                     "per_request_net_j": times * v["net_j_per_call"]["median"],
                     "power_w": v["gross_j_per_call"]["median"] / (ms / 1e3) if ms > 0 else None}
    out.update(stages=stages, request=e["request"], counter=e["counter"], repeats=e["repeats"],
               min_periods=e["min_periods"], method=e["method"])
    return out


def energy_table(latency_json: str | Path, out: str | Path) -> dict[str, Any]:
    bd = read_latency(latency_json)
    rows = [config_energy(c) for c in bd["configs"]]
    done = [r for r in rows if r["measured"]]
    meta = {k: bd["meta"][k] for k in ("model", "device", "device_type", "dtype", "weights", "protocol")}
    meta.update(convention=CONVENTION, measured=bool(done),
                reason=None if done else (rows[0]["reason"] if rows else "no configurations"))
    if done:
        periods = [r["counter"]["median_ms"] for r in done]
        idle = [r["stages"][s]["idle_w"]["median"] for r in done for s in r["stages"]]
        meta.update(counter_period_ms={"median": median(periods), "min": min(periods), "max": max(periods)},
                    idle_w={"median": median(idle), "min": min(idle), "max": max(idle)},
                    method=done[0]["method"])
    result = {"meta": meta, "configs": rows}
    write_json(out, result)
    return result


def read_energy(path: str | Path) -> dict[str, Any]:
    """The stage energy table, checked: every measured configuration has every stage's J per call >= 0."""
    rec = Record.load(path, ENERGY_RULE)
    rec["meta"].require("model", "device", "dtype", "measured", "convention")
    for row in rec.items("configs"):
        if row["measured"].expect(bool):
            for s in STAGES[: 4 if row.data["decode_tokens"] > 1 else 3]:
                row["stages"][s].number("per_request_gross_j")
                row["stages"][s]["net_j_per_call"].number("median", minimum=None)
    return rec.data
