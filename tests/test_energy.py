"""e1.energy against stand-ins: a fake GPU whose energy counter updates every P ms of a fake clock."""

from __future__ import annotations

import itertools
import sys
import time
import types

import pytest

from e1.energy import counter, gpu_state, nvml, windows


class FakeGpu:
    """Fake time and energy: every read costs read_us at idle power; the counter shows the energy integrated
    up to its last update instant (every period_ms), rounded to mJ."""

    name = "fake"

    def __init__(self, period_ms: float = 10.0, idle_w: float = 50.0, read_us: float = 20.0):
        self.period_s, self.idle_w, self.read_s = period_ms / 1e3, idle_w, read_us / 1e6
        self.t_s, self.true_j, self.shown_mj, self.edges = 0.0, 0.0, 0, 0

    def clock(self) -> float:
        return self.t_s

    def advance(self, dt_s: float, power_w: float) -> None:
        end_s = self.t_s + dt_s
        while (self.edges + 1) * self.period_s <= end_s:
            self.edges += 1
            edge_s = self.edges * self.period_s
            self.true_j += power_w * (edge_s - self.t_s)
            self.t_s = edge_s
            self.shown_mj = round(self.true_j * 1e3)
        self.true_j += power_w * (end_s - self.t_s)
        self.t_s = end_s

    def energy_mj(self) -> int:
        self.advance(self.read_s, self.idle_w)
        return self.shown_mj

    def sleep(self, seconds: float) -> None:
        self.advance(seconds, self.idle_w)

    def stage(self, ms: float, powers_w):
        """A stage call of `ms` at the next power of `powers_w` (an iterable, one value per call)."""
        powers = iter(powers_w)
        return lambda: self.advance(ms / 1e3, next(powers))


def measure(gpu: FakeGpu, stages: dict, stage_ms: dict, repeats: int = 5, **kw) -> dict:
    return windows.stage_energy(stages, stage_ms, gpu, lambda: None, period_ms=gpu.period_s * 1e3,
                                repeats=repeats, clock=gpu.clock, sleep=gpu.sleep, **kw)


def test_update_period_recovers_the_counter_period():
    gpu = FakeGpu(period_ms=25.0, read_us=50.0)
    out = counter.update_period(gpu, duration_s=0.5, clock=gpu.clock)
    assert out["median_ms"] == pytest.approx(25.0, abs=0.06)
    assert 25.0 - 0.06 <= out["min_ms"] <= out["max_ms"] <= 25.0 + 0.06
    assert out["intervals"] == 19 and out["read_us"] == pytest.approx(50.0)
    assert out["step_mj"] == pytest.approx(50.0 * 25.0, abs=1) and out["reason"] is None


def test_update_period_of_a_counter_that_never_changes():
    gpu = FakeGpu(period_ms=1e6)
    out = counter.update_period(gpu, duration_s=0.01, clock=gpu.clock)
    assert out["median_ms"] is None and out["intervals"] == 0 and "0 time(s)" in out["reason"]


def test_window_calls():
    assert windows.window_calls(2.0, 10.0) == 100  # 100 x 2 ms = 20 x 10 ms
    assert windows.window_calls(3.0, 10.0) == 67  # ceil: 67 x 3 ms >= 200 ms
    assert windows.window_calls(500.0, 10.0) == 3  # at least min_calls
    assert windows.window_calls(1.0, 100.0, min_periods=5, min_calls=1) == 500
    with pytest.raises(ValueError):
        windows.window_calls(0.0, 10.0)


def test_measure_window_is_edge_aligned():
    gpu = FakeGpu(period_ms=10.0, idle_w=50.0)
    gpu.advance(0.0037, 50.0)  # start between two updates
    w = windows.measure_window(gpu, gpu.stage(105.0, [300.0]), lambda: None, gpu.clock)
    assert w["energy_j"] * 1e3 == pytest.approx(w["window_s"] * 1e3 * 50 + 105 * 250, abs=2)
    assert w["window_s"] * 1e3 == pytest.approx(110.0, abs=0.02)  # edge to the first edge after the run, +-1 read
    assert w["run_s"] == pytest.approx(0.105, abs=2e-5) and w["tail_s"] == pytest.approx(0.005, abs=5e-5)


def test_stuck_counter_raises():
    gpu = FakeGpu(period_ms=1e6, read_us=1000.0)
    with pytest.raises(RuntimeError, match="did not change"):
        windows.measure_window(gpu, lambda: None, lambda: None, gpu.clock)


def test_idle_power():
    gpu = FakeGpu(idle_w=73.0)
    out = windows.idle_power(gpu, 0.5, lambda: None, gpu.clock, gpu.sleep)
    assert out["idle_w"] == pytest.approx(73.0, rel=1e-3) and out["window_s"] >= 0.5


def test_energy_per_call_exact_and_idle_subtracted():
    gpu = FakeGpu(period_ms=10.0, idle_w=50.0)
    out = measure(gpu, {"prefill": gpu.stage(2.0, itertools.repeat(300.0))}, {"prefill": 2.0})
    s = out["stages"]["prefill"]
    assert out["measured"] and s["calls"] == 100 and len(s["windows"]) == 5
    assert s["idle_w"]["median"] == pytest.approx(50.0, rel=1e-3)
    for kind, expect_j in (("gross_j_per_call", 300.0 * 0.002), ("net_j_per_call", 250.0 * 0.002)):
        assert s[kind]["min"] == pytest.approx(expect_j, rel=2e-3)
        assert s[kind]["max"] == pytest.approx(expect_j, rel=2e-3)
    assert s["window_s"]["min"] >= 0.2  # >= min_periods x P
    w = s["windows"][0]
    assert w["energy_j"] / s["calls"] > s["gross_j_per_call"]["max"]  # the tail is taken out of gross


def test_windows_are_sized_from_back_to_back_calls():
    """A stage whose back-to-back calls run 4x faster than its timed latency still gets windows of at least
    min_periods counter updates: the recorded windows are sized from the first, unrecorded one."""
    gpu = FakeGpu(period_ms=10.0, idle_w=50.0)
    out = measure(gpu, {"decode": gpu.stage(2.0, itertools.repeat(300.0))}, {"decode": 8.0}, repeats=3)
    s = out["stages"]["decode"]
    assert s["back_to_back_ms"] == pytest.approx(2.0, rel=1e-2) and s["calls"] == 100
    assert s["window_s"]["min"] >= 0.2


def test_spread_over_repeats():
    gpu = FakeGpu(period_ms=10.0, idle_w=40.0)
    calls = windows.window_calls(5.0, 10.0)
    per_window_w = [200.0, 200.0, 340.0, 140.0, 240.0, 90.0]  # the first is the unrecorded warm-up
    stage = gpu.stage(5.0, (p for p in per_window_w for _ in range(calls)))
    logged = []
    out = measure(gpu, {"decode": stage}, {"decode": 5.0}, log=logged.append)
    net = out["stages"]["decode"]["net_j_per_call"]
    assert net["median"] == pytest.approx((200.0 - 40) * 0.005, rel=2e-3)
    assert net["min"] == pytest.approx((90.0 - 40) * 0.005, rel=2e-3)
    assert net["max"] == pytest.approx((340.0 - 40) * 0.005, rel=2e-3)
    assert len(logged) == 6 and "5/5" in logged[-1]


def test_per_request_and_per_token():
    stage_j = {"vision_encoder": 2.0, "projector": 0.5, "prefill": 3.0, "decode": 0.25}
    assert windows.j_per_request(stage_j, 1) == 5.5  # prefill makes the first token; no decode step
    assert windows.j_per_request(stage_j, 9) == 5.5 + 8 * 0.25
    assert windows.j_per_request({k: v for k, v in stage_j.items() if k != "decode"}, 1) == 5.5
    with pytest.raises(ValueError):
        windows.j_per_request({"prefill": 1.0}, 2)
    with pytest.raises(ValueError):
        windows.j_per_request(stage_j, 0)
    result = {"measured": True, "stages": {s: {"gross_j_per_call": {"median": j}, "net_j_per_call": {"median": j / 2}}
                                           for s, j in stage_j.items()}}
    req = windows.request_energy(result, 9)
    assert req["decode_steps"] == 8
    assert req["gross"] == {"j_per_request": 7.5, "j_per_token": 7.5 / 9}
    assert req["net"]["j_per_request"] == 3.75


def _numbers(obj) -> list:
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _numbers(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in _numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_not_measured_has_the_keys_and_no_numbers():
    gpu = FakeGpu()
    measured = measure(gpu, {"projector": gpu.stage(50.0, itertools.repeat(100.0))}, {"projector": 50.0}, repeats=1)
    out = windows.not_measured("CPU only")
    assert out.keys() == measured.keys() and out["measured"] is False and out["reason"] == "CPU only"
    assert _numbers(out) == []
    assert windows.request_energy(out, 4) == {"measured": False, "reason": "CPU only"}


def test_decode_reasons():
    assert nvml.decode_reasons(0) == []
    assert nvml.decode_reasons(0x1 | 0x4 | 0x40) == ["GpuIdle", "SwPowerCap", "HwThermalSlowdown"]
    assert nvml.decode_reasons(0x2 | 0x1000) == ["ApplicationsClocksSetting", "0x1000"]
    assert nvml.THROTTLE_MASK == 0xFC and not nvml.THROTTLE_MASK & (0x1 | 0x2)


class ScriptedGpu:
    """Sensors that replay a script of (sm MHz, reasons), one entry per sample; power 1 W per MHz."""

    name = "scripted"

    def __init__(self, script, fail_power: bool = False):
        self.script, self.i, self.fail_power = list(script), -1, fail_power

    def clocks_mhz(self):
        self.i = min(self.i + 1, len(self.script) - 1)
        return self.script[self.i][0], 2619

    def power_mw(self):
        if self.fail_power:
            raise OSError("power sensor gone")
        return self.script[self.i][0] * 1000

    def temperature_c(self):
        return 40 + self.i

    def throttle_reasons(self):
        return self.script[self.i][1]


def _sampled(script, **kw) -> dict:
    sampler = gpu_state.GpuStateSampler(ScriptedGpu(script, **kw))
    for _ in script:
        sampler.sample()
    return sampler.summary()


def test_sampler_steady_clock_is_not_flagged():
    out = _sampled([(1980, 0), (1965, 0), (1980, 0), (1200, 0x1)])  # the idle sample does not count
    assert out["samples"] == 4 and out["sm_clock_mhz"] == {"min": 1200, "median": 1972.5, "max": 1980}
    assert out["power_w"]["max"] == 1980.0 and out["mem_clock_mhz"]["median"] == 2619
    assert out["temperature_c"] == {"min": 40, "median": 41.5, "max": 43}
    assert not out["clock_dropped"] and not out["throttled"] and not out["flagged"]
    assert out["info_reasons"] == ["GpuIdle"] and out["throttle_reasons"] == []


def test_sampler_flags_a_clock_drop():
    out = _sampled([(1980, 0), (1980, 0), (1700, 0), (1980, 0)])
    assert out["clock_dropped"] and not out["throttled"] and out["flagged"]


def test_sampler_flags_a_throttle_reason():
    out = _sampled([(1980, 0), (1980, 0x4), (1980, 0x20 | 0x1)])
    assert out["throttled"] and out["flagged"] and not out["clock_dropped"]
    assert out["throttle_reasons"] == ["SwPowerCap", "SwThermalSlowdown"] and out["throttled_samples"] == 2


def test_sampler_records_errors_and_none_sensors():
    out = _sampled([(1980, 0), (1980, 0)], fail_power=True)
    assert out["power_w"] is None and out["samples"] == 2
    assert out["errors"] == {"power_mw: OSError: power sensor gone": 2}
    with gpu_state.GpuStateSampler(None, reason="NVML unavailable: x") as sampler:
        pass
    assert sampler.summary() == {"measured": False, "reason": "NVML unavailable: x"}


def test_sampler_thread_samples_during_a_block():
    with gpu_state.GpuStateSampler(ScriptedGpu([(1980, 0)] * 3 + [(1980, 0x8)]), interval_s=0.001) as sampler:
        time.sleep(0.03)
    out = sampler.summary()
    assert out["samples"] >= 5 and out["throttled"] and out["errors"] == {}
    assert not sampler._thread.is_alive()


def test_open_sensors_without_a_driver():
    sensors, reason = nvml.open_sensors("GPU-00000000-0000-0000-0000-000000000000")
    assert sensors is None and reason.startswith("NVML unavailable")


def test_open_sensors_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    sensors, reason = nvml.open_sensors("GPU-0")
    assert sensors is None and reason.startswith("NVML unavailable")


def _fake_pynvml(has_event_symbol: bool, energy_ok: bool = True) -> types.ModuleType:
    """Just the part of pynvml that NvmlSensors uses."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_FunctionNotFound(NVMLError):
        pass

    m.NVMLError, m.NVMLError_FunctionNotFound = NVMLError, NVMLError_FunctionNotFound
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM, m.NVML_TEMPERATURE_GPU = 1, 2, 0
    m.inits = 0
    m.nvmlInit = lambda: setattr(m, "inits", m.inits + 1)
    m.nvmlShutdown = lambda: setattr(m, "inits", m.inits - 1)
    m.nvmlDeviceGetHandleByUUID = lambda uuid: {"uuid": uuid}
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H200"

    def energy(h):
        if not energy_ok:
            raise NVMLError("Not Supported")
        return 123456

    def event_reasons(h):
        if not has_event_symbol:
            raise NVMLError_FunctionNotFound("Function Not Found")
        return 0x4

    m.nvmlDeviceGetTotalEnergyConsumption = energy
    m.nvmlDeviceGetPowerUsage = lambda h: 350000
    m.nvmlDeviceGetClockInfo = lambda h, kind: {1: 1980, 2: 3201}[kind]
    m.nvmlDeviceGetTemperature = lambda h, kind: 45
    m.nvmlDeviceGetCurrentClocksEventReasons = event_reasons
    m.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x8
    return m


@pytest.mark.parametrize("has_event_symbol, reasons", [(True, 0x4), (False, 0x8)])
def test_nvml_sensors_through_a_stand_in_pynvml(monkeypatch, has_event_symbol, reasons):
    fake = _fake_pynvml(has_event_symbol)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sensors, reason = nvml.open_sensors("0cbd4a1e-0000")  # as torch prints it: no "GPU-"
    assert reason == "" and sensors.uuid == "GPU-0cbd4a1e-0000" and sensors.name == "NVIDIA H200"
    assert (sensors.energy_mj(), sensors.power_mw(), sensors.clocks_mhz(), sensors.temperature_c()) == \
        (123456, 350000, (1980, 3201), 45)
    assert sensors.throttle_reasons() == reasons
    sensors.close()
    assert fake.inits == 0


def test_open_sensors_without_an_energy_counter(monkeypatch):
    fake = _fake_pynvml(True, energy_ok=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sensors, reason = nvml.open_sensors("GPU-1")
    assert sensors is None and reason.startswith("no energy counter on NVIDIA H200") and fake.inits == 0


def test_the_real_binding_imports_without_a_driver():
    pynvml = pytest.importorskip("pynvml")
    assert all(hasattr(pynvml, n) for n in ("nvmlDeviceGetTotalEnergyConsumption", "NVMLError_LibraryNotFound",
                                            "nvmlDeviceGetCurrentClocksThrottleReasons"))
