"""Trace attribution (e1.trace), the per-configuration breakdown (e1.breakdown), the component ranges
(e1.components), the profile job (e1.profiling) and the breakdown figure.

Synthetic Kineto-shaped traces are built here by hand with every expected number worked out in the
comments; one real CPU trace of the tiny model is profiled end to end. CPU only, well under 40 s.
"""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from e1.profile import breakdown
from e1.model.arch import load_arch
from e1.profile.breakdown import config_breakdown, parse, study_breakdown
from e1.profile.ranges import component_map, component_ranges
from e1.names import COMP_RANGE as COMP
from e1.names import RUN_RANGE as RUN
from e1.names import STAGE_RANGE as STAGE
from e1.inputs.images import write_image
from e1.inputs.prompts import make_prompt
from e1.jobs.io import write_json
from e1.jobs.spec import ProfileJob
from fakes import KNOBS, VARIANT, measure_summary, write
from e1.plots.breakdown import plot_breakdown
from e1.profile.capture import profile_config
from e1.latency.timing import timed_generate
from e1.profile.trace import attribute, load_events

ARCH = load_arch("molmoe-1b-tiny")
CPU = torch.device("cpu")

# --- helpers to build Kineto chrome-trace events -------------------------------------------------

HOST_PID, HOST_TID, OTHER_TID = 1000, 10, 11  # the thread holding the ranges, and one without ranges
GPU_PID, STREAM7, STREAM8 = 0, 7, 8


def rng(name, ts, dur, tid=HOST_TID):
    return {"ph": "X", "cat": "user_annotation", "name": name, "pid": HOST_PID, "tid": tid, "ts": ts, "dur": dur,
            "args": {"External id": 1}}


def launch(corr, ts, tid=HOST_TID, cat="cuda_runtime", name="cudaLaunchKernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": HOST_PID, "tid": tid, "ts": ts, "dur": 3,
            "args": {"correlation": corr, "External id": 1}}


def kernel(corr, ts, dur, stream=STREAM7, cat="kernel", name="void some_kernel<float>()"):
    return {"ph": "X", "cat": cat, "name": name, "pid": GPU_PID, "tid": stream, "ts": ts, "dur": dur,
            "args": {"correlation": corr, "stream": stream, "device": 0}}


def op(name, ts, dur, tid=HOST_TID):
    return {"ph": "X", "cat": "cpu_op", "name": name, "pid": HOST_PID, "tid": tid, "ts": ts, "dur": dur,
            "args": {"External id": 1}}


def rows(df: pd.DataFrame, cols: list[str]) -> set[tuple]:
    return {tuple(r) for r in df[cols].itertuples(index=False, name=None)}


# --- synthetic CUDA trace --------------------------------------------------------------------------
#
# Host thread 10 (µs):
#   e1.run:0                         [0, 1000]
#     e1.stage:vision_encoder        [10, 100]
#       e1.comp:vit_attention@0      [20, 50]    launch c1 @20 (exactly at the range start)
#                                                launch c2 @60 (in the stage, outside any comp -> "other")
#     e1.stage:prefill               [100, 400]
#       e1.comp:attention@3          [110, 160]  launch c3 @120
#       e1.comp:moe_experts@3        [160, 260]  launch c4 @170, c5 @180
#         e1.comp:moe_router@3       [200, 220]  launch c6 @210 (nested: innermost wins)
#       e1.comp:sampling             [300, 350]  launch c7 @300 (exactly at the range start)
#     e1.stage:decode#1              [400, 500]
#       e1.comp:attention@3          [410, 430]  launch c8 @415
#       e1.comp:sampling             [450, 470]  launch c9 @455
#     e1.stage:decode#2              [500, 600]
#       e1.comp:attention@3          [510, 530]  launch c10 @515 (cuda_driver launch)
#                                                memcpy c11 @560 (outside any comp -> "other")
#     (no stage)                                 launch c12 @700 -> run 0, stage "none"
#   (no run)                                     launch c13 @1500 -> run -1, stage "none"
#   e1.run:1                         [2000, 3000]
#     e1.stage:vision_encoder        [2010, 2100]
#       e1.comp:vit_mlp@1            [2015, 2050] launch c20 @2020
#     e1.stage:prefill               [2100, 2400]
#       e1.comp:attention@0          [2105, 2200] launch c21 @2110   (layer 0 must parse as 0, not -1)
#     e1.stage:decode#1              [2400, 2500]
#       e1.comp:sampling             [2405, 2450] launch c22 @2410
# Host thread 11 (no ranges):                   launch c14 @450 (while thread 10 is in decode#1) -> "none"
# Kernel c99 has no launch event                -> run -1, stage "none"
#
# Device (kernels lag their launches):
#   c1  [200, 250]  50   c2  [260, 300] 40
#   c3  [310, 340]  30   c4  [340, 400] 60   c5 [350, 380] 30 (stream 8, overlaps c4)
#   c6  [400, 410]  10   c7  [420, 425]  5
#   c8  [500, 520]  20   c9  [530, 532]  2
#   c10 [540, 555]  15   c11 [560, 564]  4 (gpu_memcpy)
#   c12 [700, 708]   8   c13 [1500, 1503] 3   c14 [1600, 1606] 6   c99 [900, 907] 7
#   c20 [2200, 2220] 20  c21 [2300, 2340] 40  c22 [2500, 2510] 10

def cuda_trace() -> dict:
    ev = [
        rng("e1.run:0", 0, 1000),
        rng("e1.stage:vision_encoder", 10, 90),
        rng("e1.comp:vit_attention@0", 20, 30),
        rng("e1.stage:prefill", 100, 300),
        rng("e1.comp:attention@3", 110, 50),
        rng("e1.comp:moe_experts@3", 160, 100),
        rng("e1.comp:moe_router@3", 200, 20),
        rng("e1.comp:sampling", 300, 50),
        rng("e1.stage:decode#1", 400, 100),
        rng("e1.comp:attention@3", 410, 20),
        rng("e1.comp:sampling", 450, 20),
        rng("e1.stage:decode#2", 500, 100),
        rng("e1.comp:attention@3", 510, 20),
        rng("e1.run:1", 2000, 1000),
        rng("e1.stage:vision_encoder", 2010, 90),
        rng("e1.comp:vit_mlp@1", 2015, 35),
        rng("e1.stage:prefill", 2100, 300),
        rng("e1.comp:attention@0", 2105, 95),
        rng("e1.stage:decode#1", 2400, 100),
        rng("e1.comp:sampling", 2405, 45),
        # noise that must be ignored: a foreign user range, a runtime call without correlation, flow events
        rng("ProfilerStep#1", 0, 5000),
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "pid": HOST_PID, "tid": HOST_TID,
         "ts": 990, "dur": 5, "args": {}},
        {"ph": "s", "cat": "ac2g", "name": "ac2g", "id": 1, "pid": HOST_PID, "tid": HOST_TID, "ts": 20},
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "id": 1, "pid": GPU_PID, "tid": STREAM7, "ts": 200, "bp": "e"},
        {"ph": "M", "name": "process_name", "pid": GPU_PID, "args": {"name": "GPU 0"}},
        launch(1, 20), launch(2, 60),
        launch(3, 120), launch(4, 170), launch(5, 180), launch(6, 210), launch(7, 300),
        launch(8, 415), launch(9, 455),
        launch(10, 515, cat="cuda_driver", name="cuLaunchKernel"), launch(11, 560, name="cudaMemcpyAsync"),
        launch(12, 700), launch(13, 1500), launch(14, 450, tid=OTHER_TID),
        launch(20, 2020), launch(21, 2110), launch(22, 2410),
        kernel(1, 200, 50), kernel(2, 260, 40),
        kernel(3, 310, 30), kernel(4, 340, 60), kernel(5, 350, 30, stream=STREAM8), kernel(6, 400, 10),
        kernel(7, 420, 5),
        kernel(8, 500, 20), kernel(9, 530, 2),
        kernel(10, 540, 15), kernel(11, 560, 4, cat="gpu_memcpy", name="Memcpy DtoD"),
        kernel(12, 700, 8), kernel(13, 1500, 3), kernel(14, 1600, 6), kernel(99, 900, 7),
        kernel(20, 2200, 20), kernel(21, 2300, 40), kernel(22, 2500, 10),
    ]
    return {"schemaVersion": 1, "traceEvents": ev}


@pytest.fixture(scope="module")
def cuda_attr():
    comp, stages, _kernels, kind = attribute(cuda_trace()["traceEvents"])
    return comp, stages, kind


def test_kernel_table_holds_the_llm_kernels_by_name():
    _, _, kernels, _ = attribute(cuda_trace()["traceEvents"])
    assert list(kernels.columns) == ["stage", "component", "name", "n_kernels", "time_us"]
    assert set(kernels.stage) == {"prefill", "decode"}
    # prefill of run 0: c3 (attention, 30) c4 (experts, 60) c5 (router, 30) c6 (sampling, 10) c7 (prefill, 5),
    # run 1: c21 (attention, 40); decode: c8 (attention 20) c9 (sampling 2) c10 (attention 15) c11 (memcpy 4),
    # c22 (sampling 10)
    assert kernels.time_us.sum() == 30 + 60 + 30 + 10 + 5 + 40 + 20 + 2 + 15 + 4 + 10
    by = kernels.groupby(["stage", "component"]).time_us.sum().to_dict()
    assert by[("prefill", "attention")] == 70 and by[("decode", "attention")] == 35


def test_kernel_names_classify_graph_kernels_and_are_checked_on_eager():
    def table(rows):
        return pd.DataFrame(rows, columns=["stage", "component", "name", "n_kernels", "time_us"])

    a = table([("prefill", "attention", "flash_fwd", 1, 50.0), ("prefill", "moe_experts", "grouped_gemm", 1, 80.0),
               ("prefill", "attention", "gemm_128", 1, 30.0), ("prefill", "moe_router", "gemm_128", 1, 10.0)])
    b = table([("prefill", "attention", "flash_fwd", 1, 40.0), ("prefill", "moe_experts", "grouped_gemm", 1, 90.0),
               ("prefill", "moe_router", "topk", 1, 5.0)])
    mapping = breakdown.learn_kernel_groups([a, b])
    assert mapping == {"flash_fwd": "attention", "grouped_gemm": "FFN / MoE experts", "gemm_128": "attention",
                       "topk": "MoE router"}
    graph = table([("decode", "other", "flash_fwd", 1, 4.0), ("decode", "other", "new_kernel", 1, 1.0)])
    assert breakdown.classify_kernels(graph, mapping).predicted.tolist() == ["attention", "unclassified"]
    # a classified from b alone: the router's gemm_128 is unknown to b, so 40 of 170 us disagree
    agreement = breakdown.kernel_agreement(a, breakdown.learn_kernel_groups([b]))
    assert agreement == {"prefill": pytest.approx(130 / 170)}


COMP_COLS = ["run", "stage", "step", "component", "layer", "n_kernels", "time_us"]
STAGE_COLS = ["run", "stage", "step", "wall_us", "busy_us", "kernel_us", "n_kernels"]


def test_cuda_kind_and_columns(cuda_attr):
    comp, stages, kind = cuda_attr
    assert kind == "cuda"
    assert list(comp.columns) == COMP_COLS
    assert list(stages.columns) == STAGE_COLS


def test_cuda_components_exact(cuda_attr):
    comp, _, _ = cuda_attr
    expected = {
        # launched outside any stage: c13 (3, no run), c14 (6, other thread), c99 (7, no launch) -> run -1
        (-1, "none", -1, "other", -1, 3, 16.0),
        (0, "none", -1, "other", -1, 1, 8.0),  # c12: inside run 0, outside every stage
        (0, "vision_encoder", -1, "vit_attention", 0, 1, 50.0),  # c1, launched exactly at the comp start
        (0, "vision_encoder", -1, "other", -1, 1, 40.0),  # c2
        (0, "prefill", -1, "attention", 3, 1, 30.0),  # c3
        (0, "prefill", -1, "moe_experts", 3, 2, 90.0),  # c4 60 + c5 30 (overlapping streams, durations add)
        (0, "prefill", -1, "moe_router", 3, 1, 10.0),  # c6: the nested router range wins over moe_experts
        (0, "prefill", -1, "sampling", -1, 1, 5.0),  # c7, launched exactly at the comp start
        (0, "decode", 1, "attention", 3, 1, 20.0),  # c8
        (0, "decode", 1, "sampling", -1, 1, 2.0),  # c9
        (0, "decode", 2, "attention", 3, 1, 15.0),  # c10 (cuda_driver launch)
        (0, "decode", 2, "other", -1, 1, 4.0),  # c11 memcpy
        (1, "vision_encoder", -1, "vit_mlp", 1, 1, 20.0),  # c20
        (1, "prefill", -1, "attention", 0, 1, 40.0),  # c21: "@0" is layer 0
        (1, "decode", 1, "sampling", -1, 1, 10.0),  # c22
    }
    assert rows(comp, COMP_COLS) == expected
    assert len(comp) == len(expected)  # no duplicate groups
    # nothing dropped: all 18 activities (c1..c14, c20..c22, c99), 360 µs in all
    assert comp.n_kernels.sum() == 18
    assert comp.time_us.sum() == pytest.approx(50 + 40 + 30 + 60 + 30 + 10 + 5 + 20 + 2 + 15 + 4 + 8 + 3 + 6 + 7
                                               + 20 + 40 + 10)


def test_cuda_layers_and_steps(cuda_attr):
    comp, stages, _ = cuda_attr
    assert set(comp.loc[comp.component == "attention", "layer"]) == {0, 3}
    assert set(comp.loc[comp.component.isin(["sampling", "other"]), "layer"]) == {-1}
    assert sorted(comp.loc[comp.stage == "decode", "step"].unique()) == [1, 2]
    assert set(comp.loc[comp.stage != "decode", "step"]) == {-1}
    assert sorted(stages.loc[(stages.run == 0) & (stages.stage == "decode"), "step"]) == [1, 2]
    assert sorted(stages.loc[(stages.run == 1) & (stages.stage == "decode"), "step"]) == [1]
    assert comp.dtypes["layer"].kind == "i" and comp.dtypes["step"].kind == "i" and comp.dtypes["run"].kind == "i"


def test_cuda_stages_exact(cuda_attr):
    _, stages, _ = cuda_attr
    expected = {
        # run 0
        # vision: first stage -> from its first kernel start (200) to its last end (300) = 100;
        #         busy = [200,250] + [260,300] = 90
        (0, "vision_encoder", -1, 100.0, 90.0, 90.0, 2),
        # prefill: wall = 425 (c7 end) - 300 (vision's last end) = 125;
        #          busy = union([310,340],[340,400],[350,380],[400,410]) = [310,410] 100 + [420,425] 5 = 105;
        #          kernels = 30 + 60 + 30 + 10 + 5 = 135 > busy
        (0, "prefill", -1, 125.0, 105.0, 135.0, 5),
        # decode#1: wall = 532 - 425 = 107; busy = 20 + 2 = 22
        (0, "decode", 1, 107.0, 22.0, 22.0, 2),
        # decode#2: wall = 564 - 532 = 32; busy = 15 + 4 = 19
        (0, "decode", 2, 32.0, 19.0, 19.0, 2),
        # run 1 (its own first stage starts the chain again; run 0's kernels never leak in)
        (1, "vision_encoder", -1, 20.0, 20.0, 20.0, 1),  # [2200, 2220]
        (1, "prefill", -1, 120.0, 40.0, 40.0, 1),  # 2340 - 2220
        (1, "decode", 1, 170.0, 10.0, 10.0, 1),  # 2510 - 2340
    }
    assert rows(stages, STAGE_COLS) == expected
    assert len(stages) == 7
    assert "none" not in set(stages.stage)
    assert (stages.wall_us >= stages.busy_us).all()
    assert (stages.busy_us <= stages.kernel_us).all()


def test_cuda_kernel_event_order_does_not_matter():
    trace = cuda_trace()
    a = attribute(trace["traceEvents"])
    b = attribute(list(reversed(trace["traceEvents"])))
    key = ["run", "stage", "step", "component", "layer"]
    pd.testing.assert_frame_equal(a[0].sort_values(key).reset_index(drop=True),
                                  b[0].sort_values(key).reset_index(drop=True))
    key = ["run", "stage", "step"]
    pd.testing.assert_frame_equal(a[1].sort_values(key).reset_index(drop=True),
                                  b[1].sort_values(key).reset_index(drop=True))


def test_cuda_summary_unattributed_and_stages(cuda_attr):
    comp, stages, _ = cuda_attr
    routing = pd.DataFrame({"layer": [0, 0, 1, 1], "expert": [0, 1, 0, 1], "tokens": [3, 1, 2, 0]})
    s = config_breakdown(comp, stages, {"profiled_decode_steps": 1, "profiled_runs": [{"run": 0}, {"run": 1}]}, routing)
    # stage "none": c12 + c13 + c14 + c99
    assert s["unattributed_kernels"] == {"count": 4, "time_ms": pytest.approx((8 + 3 + 6 + 7) / 1e3)}
    # vision: mean over runs 0 and 1 of the per-run values
    v = s["stages"]["vision_encoder"]
    assert v["wall_ms"] == pytest.approx((100 + 20) / 2 / 1e3)
    assert v["busy_ms"] == pytest.approx((90 + 20) / 2 / 1e3)
    assert v["idle_ms"] == pytest.approx((120 - 110) / 2 / 1e3)
    assert v["kernels"] == 1  # (2 + 1) / 2 runs, truncated
    # prefill: wall (125+120)/2, busy (105+40)/2
    p = s["stages"]["prefill"]
    assert p["wall_ms"] == pytest.approx(0.1225) and p["busy_ms"] == pytest.approx(0.0725)
    assert p["idle_share"] == pytest.approx(0.05 / 0.1225)
    assert set(p["groups_ms"]) == {"attention", "FFN / MoE experts", "MoE router", "other"}
    assert "projector" not in s["stages"] or s["stages"]["projector"]["busy_ms"] == 0.0
    # routing: layer 0 max/mean = 3/2, layer 1 = 2/1; unused experts 0 and 1
    assert s["routing"]["imbalance_max_over_mean_by_layer"] == pytest.approx([1.5, 2.0])
    assert s["routing"]["imbalance_mean"] == pytest.approx(1.75)
    assert s["routing"]["experts_unused_by_layer"] == [0, 1]


def test_summary_component_mean_is_over_all_runs(cuda_attr):
    comp, stages, _ = cuda_attr
    routing = pd.DataFrame({"layer": [0], "expert": [0], "tokens": [1]})
    s = config_breakdown(comp, stages, {"profiled_decode_steps": 1, "profiled_runs": [{"run": 0}, {"run": 1}]}, routing)
    # moe_experts ran 90 µs in run 0 and not at all in run 1: the per-run mean over 2 runs is 45 µs
    assert s["stages"]["prefill"]["components_ms"]["moe_experts"] == pytest.approx(0.045)


def test_touching_ranges_do_not_leak():
    # decode#1 [400, 500] whose sampling range [450, 500] ends exactly where decode#2 [500, 600] starts;
    # a kernel launched at 560 in decode#2 outside any comp must be "other", not "sampling".
    ev = [rng("e1.run:0", 0, 1000), rng("e1.stage:decode#1", 400, 100), rng("e1.comp:sampling", 450, 50),
          rng("e1.stage:decode#2", 500, 100),
          launch(1, 455), launch(2, 560), kernel(1, 600, 5), kernel(2, 610, 5)]
    comp, _, _, _ = attribute(ev)
    got = {(r.step, r.component) for r in comp.itertuples()}
    assert got == {(1, "sampling"), (2, "other")}


def test_launch_at_range_end_is_inside():
    # ranges are closed intervals: a launch exactly at a comp's end still belongs to it
    ev = [rng("e1.run:0", 0, 1000), rng("e1.stage:prefill", 0, 500), rng("e1.comp:attention@1", 100, 50),
          launch(1, 150), launch(2, 151), kernel(1, 600, 5), kernel(2, 610, 5)]
    comp, _, _, _ = attribute(ev)
    assert rows(comp, ["component", "layer", "time_us"]) == {("attention", 1, 5.0), ("other", -1, 5.0)}


def test_no_ranges_at_all_everything_unattributed():
    comp, stages, _, kind = attribute([launch(1, 0), kernel(1, 10, 5), kernel(2, 20, 5)])
    assert kind == "cuda"
    assert rows(comp, COMP_COLS) == {(-1, "none", -1, "other", -1, 2, 10.0)}
    assert stages.empty and list(stages.columns) == STAGE_COLS


# --- synthetic CPU trace (no device activity: top-level ATen ops of the range thread) ------------
#
# Thread 10:
#   e1.run:0                        [0, 1000]
#     e1.stage:prefill              [0, 500]
#       e1.comp:attention@1         [10, 100]
#         aten::linear   [20, 80]  60   top level
#           aten::t      [22, 24]       nested, ignored
#           aten::addmm  [25, 75]       nested, ignored
#         aten::view     [80, 85]   5   top level (starts exactly where linear ends)
#       e1.comp:sampling            [190, 240]
#         aten::argmax   [200, 230] 30
#       aten::add        [300, 310] 10  in the stage, no comp -> "other"
#     e1.stage:decode#1             [500, 580]
#       e1.comp:attention@1         [505, 560]
#         aten::matmul   [520, 540] 20  top level
#           aten::bmm    [520, 535]     same start as its parent: nested, ignored
#     aten::copy_        [600, 620] 20  in run 0, outside every stage -> "none"
# Thread 11 (no ranges): aten::mul [50, 90] -> ignored entirely

def cpu_trace() -> dict:
    ev = [
        rng("e1.run:0", 0, 1000), rng("e1.stage:prefill", 0, 500), rng("e1.comp:attention@1", 10, 90),
        rng("e1.comp:sampling", 190, 50), rng("e1.stage:decode#1", 500, 80), rng("e1.comp:attention@1", 505, 55),
        op("aten::addmm", 25, 50), op("aten::linear", 20, 60), op("aten::t", 22, 2), op("aten::view", 80, 5),
        op("aten::argmax", 200, 30), op("aten::add", 300, 10),
        op("aten::bmm", 520, 15), op("aten::matmul", 520, 20),
        op("aten::copy_", 600, 20),
        op("aten::mul", 50, 40, tid=OTHER_TID),
        {"ph": "M", "name": "thread_name", "pid": HOST_PID, "tid": HOST_TID, "args": {"name": "python"}},
    ]
    return {"traceEvents": ev}


def test_cpu_trace_top_level_ops():
    comp, stages, _, kind = attribute(cpu_trace()["traceEvents"])
    assert kind == "cpu"
    assert rows(comp, COMP_COLS) == {
        (0, "prefill", -1, "attention", 1, 2, 65.0),  # linear 60 + view 5
        (0, "prefill", -1, "sampling", -1, 1, 30.0),
        (0, "prefill", -1, "other", -1, 1, 10.0),
        (0, "decode", 1, "attention", 1, 1, 20.0),  # matmul only
        (0, "none", -1, "other", -1, 1, 20.0),  # copy_
    }
    # prefill: first op start 20 -> last end 310: wall 290, busy = kernels = 60 + 5 + 30 + 10 = 105
    # decode#1: 540 - 310 = 230, busy 20
    assert rows(stages, STAGE_COLS) == {(0, "prefill", -1, 290.0, 105.0, 105.0, 4),
                                        (0, "decode", 1, 230.0, 20.0, 20.0, 1)}


def test_cpu_trace_without_ranges_is_empty():
    # no e1 ranges -> no range thread -> no activities, and kind "cpu"
    comp, stages, _, kind = attribute([op("aten::mm", 0, 10)])
    assert kind == "cpu" and comp.empty and stages.empty


# --- load_events -----------------------------------------------------------------------------------

def test_load_events_json_and_gzip(tmp_path):
    trace = cuda_trace()
    plain, gz = tmp_path / "t.json", tmp_path / "t.json.gz"
    plain.write_text(json.dumps(trace))
    with gzip.open(gz, "wt") as f:
        json.dump(trace, f)
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    assert load_events(plain) == trace["traceEvents"] == load_events(str(gz))
    a, b = attribute(load_events(plain)), attribute(load_events(gz))
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])


# --- component ranges and annotated timing on the real tiny model -----------------------------------

def _logits(model, inp):
    with torch.inference_mode():
        feats = model.encode_images(inp.crops)
        return model.forward_logits(inp.input_ids, model.project(feats, inp.patch_masks), inp.feature_index,
                                    inp.token_position)


def test_component_map_has_no_duplicate_modules(model):
    mods = [id(m) for m, _ in component_map(model)]
    assert len(mods) == len(set(mods))  # a module wrapped twice could not be restored by del __dict__


def test_component_ranges_restore_forwards(model, inp):
    mods = [m for m, _ in component_map(model)]
    assert all("forward" not in m.__dict__ for m in mods) and "embed_inputs" not in model.__dict__
    ref = _logits(model, inp)
    with component_ranges(model):
        assert all("forward" in m.__dict__ for m in mods) and "embed_inputs" in model.__dict__
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            inside = _logits(model, inp)
    names = {e.name for e in prof.events()}
    for n in ("e1.comp:attention@0", "e1.comp:moe_experts@1", "e1.comp:moe_router@0", "e1.comp:lm_head",
              "e1.comp:vit_attention@2", "e1.comp:vit_mlp@0", "e1.comp:embedding", "e1.comp:projector_mlp",
              "e1.comp:pooling"):
        assert n in names, n
    assert all("forward" not in m.__dict__ for m in mods) and "embed_inputs" not in model.__dict__
    assert all(m.forward.__func__ is type(m).forward for m in mods)
    after = _logits(model, inp)
    assert torch.equal(ref, inside) and torch.equal(ref, after)


def test_component_ranges_restore_on_exception(model):
    mods = [m for m, _ in component_map(model)]
    with pytest.raises(RuntimeError, match="boom"):
        with component_ranges(model):
            raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in mods) and "embed_inputs" not in model.__dict__


def test_annotate_same_tokens(model, inp):
    plain = timed_generate(model, inp, 4)
    with component_ranges(model):
        annotated = timed_generate(model, inp, 4, annotate=True)
    assert torch.equal(plain.tokens, annotated.tokens)
    assert list(annotated.stages_ms) == list(plain.stages_ms) and len(annotated.decode_steps_ms) == 3


def test_annotate_emits_stage_ranges(model, inp):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_generate(model, inp, 3, annotate=True)
    names = [e.name for e in prof.events() if e.name.startswith("e1.")]
    assert sorted(set(names)) == ["e1.comp:sampling", "e1.stage:decode#1", "e1.stage:decode#2",
                                  "e1.stage:prefill", "e1.stage:projector", "e1.stage:vision_encoder"]
    assert names.count("e1.comp:sampling") == 3  # prefill + 2 decode steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_generate(model, inp, 3)
    assert not [e for e in prof.events() if e.name.startswith("e1.")]


# --- real CPU profile end to end -----------------------------------------------------------------

SPEC = {"id": "t", "model": "molmoe-1b-tiny", "device": "cpu", "dtype": "float32", "weights": "random", "seed": 0,
        "variant": VARIANT, "knobs": KNOBS, "image": "336x336", "prompt": "short", "decode_tokens": 5, "warmup": 1,
        "runs": 2, "max_decode_steps": 3}


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("profile")
    write_image(d / "img.png", 336, 336)
    write_json(d / "prompt.json", make_prompt(ARCH, "short", 16, None, None))
    spec = ProfileJob(**SPEC, image_path=str(d / "img.png"), prompt_path=str(d / "prompt.json"))
    paths = {k: d / n for k, n in (("trace", "trace.json.gz"), ("profile", "profile.json"),
                                   ("routing", "routing.parquet"), ("comp", "comp.parquet"),
                                   ("stages", "stages.parquet"), ("kernels", "kernels.parquet"),
                                   ("summary", "summary.json"))}
    prof = profile_config(spec, paths["trace"], paths["profile"], paths["routing"])
    summary = parse(paths["trace"], paths["profile"], paths["routing"], paths["comp"], paths["stages"],
                    paths["kernels"], paths["summary"])
    return {"dir": d, "paths": paths, "profile": prof, "summary": summary}


def test_profile_json(profiled):
    p = profiled["profile"]
    assert p["profiled_new_tokens"] == 4 and p["profiled_decode_steps"] == 3  # min(5, 3 + 1) - 1
    assert json.loads(profiled["paths"]["profile"].read_text()) == json.loads(json.dumps(p))
    assert [r["run"] for r in p["profiled_runs"]] == [0, 1]
    assert all(len(r["decode_steps_ms"]) == 3 for r in p["profiled_runs"])
    assert p["meta"]["device_type"] == "cpu" and p["meta"]["model"] == "molmoe-1b-tiny"


def test_trace_file_is_gzip_chrome_json(profiled):
    path = profiled["paths"]["trace"]
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    ev = data["traceEvents"]
    assert isinstance(ev, list) and ev
    assert all("ph" in e for e in ev)
    ranges = {e["name"] for e in ev if e.get("cat") == "user_annotation"}
    assert {"e1.run:0", "e1.run:1", "e1.stage:decode#3", "e1.comp:moe_experts@1"} <= ranges
    assert "e1.stage:decode#4" not in ranges
    assert all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 for e in ev if e.get("ph") == "X")


def test_parse_summary_stages_and_components(profiled):
    s = profiled["summary"]
    assert s["profiled_decode_steps"] == 3
    assert s["device_activity"] == "top-level ATen ops (CPU)"
    assert set(s["stages"]) == {"vision_encoder", "projector", "prefill", "decode_per_token"}
    for stage in ("prefill", "decode_per_token"):
        c = s["stages"][stage]["components_ms"]
        for name in ("attention", "moe_experts", "moe_router", "lm_head", "sampling"):
            assert c.get(name, 0.0) > 0, (stage, name, c)
        assert set(s["stages"][stage]["groups_ms"]) <= {"attention", "FFN / MoE experts", "MoE router", "other"}
        assert sum(s["stages"][stage]["groups_ms"].values()) == pytest.approx(sum(c.values()))
    v = s["stages"]["vision_encoder"]["components_ms"]
    assert v["vit_attention"] > 0 and v["vit_mlp"] > 0
    assert s["stages"]["projector"]["components_ms"].get("projector_mlp", 0) > 0
    for name, e in s["stages"].items():
        assert e["sum_check"]["holds"] and e["sum_check"]["relative_error"] <= 0.01, (name, e["sum_check"])
        assert e["idle_ms"] >= 0 and e["wall_ms"] >= e["busy_ms"] > 0, (name, e)
        assert 0 <= e["idle_share"] < 1
        assert e["kernels"] > 0
    # outside the stages only the bookkeeping between/after them runs (a few ops per run)
    un = s["unattributed_kernels"]
    assert 0 <= un["count"] < 10 * 2 and un["time_ms"] >= 0
    assert set(s["profiled_event_ms"]) == {"vision_encoder", "projector", "prefill", "decode_per_token"}
    assert all(v > 0 for v in s["profiled_event_ms"].values())
    assert json.loads(profiled["paths"]["summary"].read_text()) == json.loads(json.dumps(s))


def test_parse_tables_account_for_every_op(profiled):
    paths = profiled["paths"]
    comp, stages = pd.read_parquet(paths["comp"]), pd.read_parquet(paths["stages"])
    assert set(stages.run) == {0, 1}
    assert set(comp.run) <= {-1, 0, 1}
    # every stage instance present in both runs: vision, projector, prefill, decode#1..3
    for run in (0, 1):
        got = stages[stages.run == run]
        assert sorted(zip(got.stage, got.step)) == sorted(
            [("decode", 1), ("decode", 2), ("decode", 3), ("prefill", -1), ("projector", -1),
             ("vision_encoder", -1)])
    # inside a stage, components partition the stage's activity exactly (nothing lost, nothing doubled)
    staged = comp[comp.stage != "none"].groupby(["run", "stage", "step"])[["time_us", "n_kernels"]].sum()
    st = stages.set_index(["run", "stage", "step"])
    pd.testing.assert_series_equal(staged["time_us"].sort_index(), st["kernel_us"].sort_index(),
                                   check_names=False, rtol=1e-9)
    assert (staged["n_kernels"].sort_index() == st["n_kernels"].sort_index()).all()
    # top-level ops of one thread do not overlap: busy == kernel sum (up to float rounding of the timestamps)
    assert ((st["busy_us"] - st["kernel_us"]).abs() <= 1e-5 * st["kernel_us"]).all()
    # the component ranges cover almost all work: few ops fall into a stage's "other" bucket (counted, not
    # timed, so a busy machine cannot make this flaky)
    for (run, stage, step), g in comp[comp.stage.isin(["vision_encoder", "prefill", "decode"])].groupby(
            ["run", "stage", "step"]):
        assert g.loc[g.component == "other", "n_kernels"].sum() < 0.15 * g.n_kernels.sum(), (run, stage, step)
    # LLM layers: attention/experts/router on layers 0..L-1 in prefill and every decode step
    L = ARCH.llm["num_layers"]
    for name in ("attention", "moe_experts", "moe_router"):
        for (run, stage, step), g in comp[comp.stage.isin(["prefill", "decode"])].groupby(["run", "stage", "step"]):
            layers = set(g.loc[g.component == name, "layer"]) - {-1}
            assert layers == set(range(L)), (name, run, stage, step, layers)
    vit_layers = set(comp.loc[comp.component == "vit_mlp", "layer"])
    assert vit_layers == set(range(ARCH.vision["num_layers"]))
    # the "none" bucket is exactly what the summary reports as unattributed
    none = comp[comp.stage == "none"]
    un = profiled["summary"]["unattributed_kernels"]
    assert un["count"] == int(none.n_kernels.sum())
    assert un["time_ms"] == pytest.approx(none.time_us.sum() / 1e3)


def test_parse_agrees_with_raw_trace(profiled):
    # total top-level op time on the range thread == everything in the components table (stage "none" included)
    ev = load_events(profiled["paths"]["trace"])
    tids = {e["tid"] for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith("e1.")}
    assert len(tids) == 1
    ops = sorted((e for e in ev if e.get("cat") == "cpu_op" and e["tid"] in tids), key=lambda e: (e["ts"], -e["dur"]))
    top, end = [], float("-inf")
    for e in ops:
        if e["ts"] >= end:
            top.append(e)
            end = e["ts"] + e["dur"]
    comp = pd.read_parquet(profiled["paths"]["comp"])
    assert comp.n_kernels.sum() == len(top)
    assert comp.time_us.sum() == pytest.approx(sum(e["dur"] for e in top))


def test_routing_table(profiled):
    r = pd.read_parquet(profiled["paths"]["routing"])
    L, E, k = ARCH.llm["num_layers"], ARCH.llm["num_experts"], ARCH.llm["top_k"]
    assert list(r.columns) == ["layer", "expert", "tokens"]
    assert len(r) == L * E
    assert sorted(zip(r.layer, r.expert)) == [(i, e) for i in range(L) for e in range(E)]
    assert (r.tokens >= 0).all()
    n = profiled["profile"]["counts"]["prefill_tokens"]
    assert n == profiled["summary"]["counts"]["prefill_tokens"] > 0
    assert r.groupby("layer")["tokens"].sum().tolist() == [n * k] * L
    rt = profiled["summary"]["routing"]
    assert len(rt["imbalance_max_over_mean_by_layer"]) == L
    assert all(x >= 1.0 for x in rt["imbalance_max_over_mean_by_layer"])
    assert len(rt["experts_unused_by_layer"]) == L


# --- aggregate + figure ------------------------------------------------------------------------------

def test_aggregate_and_plot(profiled, tmp_path):
    _d, paths, s1 = profiled["dir"], profiled["paths"], profiled["summary"]
    # a second configuration: the same trace, re-parsed under another id / image
    prof2 = json.loads(paths["profile"].read_text()) | {"id": "t2", "image": "672x336"}
    (tmp_path / "profile2.json").write_text(json.dumps(prof2))
    s2 = parse(paths["trace"], tmp_path / "profile2.json", paths["routing"], tmp_path / "c2.parquet",
               tmp_path / "s2.parquet", tmp_path / "k2.parquet", tmp_path / "summary2.json")
    assert s2["id"] == "t2" and s2["stages"] == s1["stages"]

    def measured(cid, stage_ms, decode_ms):
        return write(tmp_path / f"measure_{cid}.json", measure_summary(cid, stage_ms, decode_ms))

    m1 = measured("t", {"vision_encoder": 2.0, "projector": 0.5, "prefill": 4.0}, 1.25)
    m2 = measured("t2", {"vision_encoder": 1.0, "projector": 0.0, "prefill": 8.0}, None)  # 0 ms -> no ratio
    out = tmp_path / "agg" / "breakdown.json"
    res = study_breakdown([paths["summary"], tmp_path / "summary2.json"], [paths["kernels"], tmp_path / "k2.parquet"],
                          [m1, m2, measured("other", {}, None)], out)
    assert json.loads(out.read_text()) == res
    c1, c2 = res["configs"]
    assert c1["id"] == "t" and c2["id"] == "t2"
    assert "meta" not in c1 and "meta" not in c2
    ev = s1["profiled_event_ms"]
    assert c1["profiled_over_timed"] == pytest.approx({
        "vision_encoder": ev["vision_encoder"] / 2.0, "projector": ev["projector"] / 0.5,
        "prefill": ev["prefill"] / 4.0, "decode_per_token": ev["decode_per_token"] / 1.25})
    assert c2["profiled_over_timed"] == pytest.approx({"vision_encoder": ev["vision_encoder"] / 1.0,
                                                       "prefill": ev["prefill"] / 8.0})
    # idle against the timed (un-profiled) wall: 1 - busy / timed, floored at 0; absent where timed is 0
    for stage, timed_ms in (("vision_encoder", 2.0), ("prefill", 4.0), ("decode_per_token", 1.25)):
        e = c1["stages"][stage]
        assert e["timed_wall_ms"] == timed_ms
        assert e["idle_share_timed"] == pytest.approx(max(0.0, 1 - e["busy_ms"] / timed_ms))
    assert "idle_share_timed" not in c2["stages"]["projector"]
    # the profiled-event decode time is per token: the mean over runs of the summed steps / steps
    runs = profiled["profile"]["profiled_runs"]
    assert ev["decode_per_token"] == pytest.approx(sum(sum(r["decode_steps_ms"]) for r in runs) / 2 / 3)
    meta = res["meta"]
    assert meta["model"] == "molmoe-1b-tiny" and meta["device_type"] == "cpu"
    assert meta["convention"] == breakdown.CONVENTION
    assert "env" not in meta

    # a summary without a matching measure has no ratios
    res2 = study_breakdown([paths["summary"]], [paths["kernels"]], [m2], tmp_path / "b2.json")
    assert "profiled_over_timed" not in res2["configs"][0]

    png = tmp_path / "fig" / "breakdown.png"
    plot_breakdown(out, png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# --- range-name constants are what the parser expects ---------------------------------------------

def test_range_prefixes():
    assert (RUN, STAGE, COMP) == ("e1.run:", "e1.stage:", "e1.comp:")
