"""GPU counters and sensors through NVML (package nvidia-ml-py, module pynvml), behind a small protocol.

The protocol lets the energy method and the state sampler run against a stand-in on the CPU. pynvml is
imported only when a real GPU is opened; without the package or a driver, open_sensors gives None and why.
"""

from __future__ import annotations

from typing import Protocol

# Clock event ("throttle") reasons that mean the SM clock was held below what the work asked for.
THROTTLE_REASONS = {
    0x4: "SwPowerCap",
    0x8: "HwSlowdown",
    0x10: "SyncBoost",
    0x20: "SwThermalSlowdown",
    0x40: "HwThermalSlowdown",
    0x80: "HwPowerBrakeSlowdown",
}
# Informational reasons: the GPU had nothing to run, or its clocks were set on purpose. They do not flag.
INFO_REASONS = {0x1: "GpuIdle", 0x2: "ApplicationsClocksSetting", 0x100: "DisplayClockSetting"}
THROTTLE_MASK = sum(THROTTLE_REASONS)
GPU_IDLE = 0x1


class GpuSensors(Protocol):
    """One GPU's counters and sensors, read on demand."""

    name: str

    def energy_mj(self) -> int:
        """Cumulative total energy since the driver loaded (mJ); it advances in steps, once per update period."""

    def power_mw(self) -> int:
        """Board power (mW), as the driver reports it (on recent GPUs an average over a recent interval)."""

    def clocks_mhz(self) -> tuple[int, int]:
        """Current (SM, memory) clocks (MHz)."""

    def temperature_c(self) -> int:
        """GPU die temperature (C)."""

    def throttle_reasons(self) -> int:
        """Bitmask of the clock event reasons active now (THROTTLE_REASONS, INFO_REASONS)."""


def decode_reasons(mask: int) -> list[str]:
    """Names of the reasons set in `mask`, lowest bit first; bits not named here as hex."""
    known = THROTTLE_REASONS | INFO_REASONS
    names, bit = [], 1
    while bit <= mask:
        if mask & bit:
            names.append(known.get(bit, hex(bit)))
        bit <<= 1
    return names


def nvml_uuid(uuid: str) -> str:
    """The UUID as NVML names it: torch's str(get_device_properties(i).uuid) lacks the "GPU-" prefix."""
    return uuid if uuid.startswith(("GPU-", "MIG-")) else "GPU-" + uuid


class NvmlSensors:
    """A GPU by UUID through NVML. Raises ImportError or pynvml.NVMLError when it cannot be opened."""

    def __init__(self, uuid: str):
        import pynvml

        self._nvml = pynvml
        self.uuid = nvml_uuid(uuid)
        pynvml.nvmlInit()
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(self.uuid)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self._reasons = self._reasons_function()
        except pynvml.NVMLError:
            pynvml.nvmlShutdown()
            raise

    def _reasons_function(self):
        """nvmlDeviceGetCurrentClocksEventReasons, or the older ...ThrottleReasons where binding or driver lack it."""
        nvml = self._nvml
        event = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if event is not None:
            try:
                event(self._handle)
                return event
            except nvml.NVMLError_FunctionNotFound:
                pass
        return nvml.nvmlDeviceGetCurrentClocksThrottleReasons

    def energy_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def power_mw(self) -> int:
        return int(self._nvml.nvmlDeviceGetPowerUsage(self._handle))

    def clocks_mhz(self) -> tuple[int, int]:
        nvml = self._nvml
        return (int(nvml.nvmlDeviceGetClockInfo(self._handle, nvml.NVML_CLOCK_SM)),
                int(nvml.nvmlDeviceGetClockInfo(self._handle, nvml.NVML_CLOCK_MEM)))

    def temperature_c(self) -> int:
        return int(self._nvml.nvmlDeviceGetTemperature(self._handle, self._nvml.NVML_TEMPERATURE_GPU))

    def throttle_reasons(self) -> int:
        return int(self._reasons(self._handle))

    def close(self) -> None:
        """Release this object's nvmlInit (NVML counts them)."""
        self._nvml.nvmlShutdown()


def open_sensors(uuid: str) -> tuple[GpuSensors | None, str]:
    """(sensors, "") for the GPU with this UUID, or (None, why) when NVML or its energy counter is unavailable.

    The energy counter is read once here: GPUs before Volta and some virtual GPUs do not have one.
    """
    try:
        import pynvml
    except ImportError as e:
        return None, f"NVML unavailable: {e}"
    try:
        sensors = NvmlSensors(uuid)
    except pynvml.NVMLError as e:
        return None, f"NVML unavailable: {type(e).__name__}: {e}"
    try:
        sensors.energy_mj()
    except pynvml.NVMLError as e:
        sensors.close()
        return None, f"no energy counter on {sensors.name}: {type(e).__name__}: {e}"
    return sensors, ""
