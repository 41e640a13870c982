"""Device claims: one GPU per job on a multi-GPU node, and one CPU timing job at a time per host.

GPU: claim a free GPU before CUDA starts, hold it until the process ends.

Snakemake's local executor counts `--resources gpu=K` but does not say which GPU a job gets. A GPU job
calls `claim_for(device)` first thing (the CLI does, for device `cuda`), before anything touches CUDA:

- pinned already: exactly one device visible (a SLURM gres job, `CUDA_VISIBLE_DEVICES=3`, a one-GPU
  machine): nothing is changed, the device is only recorded;
- otherwise the candidates are the `CUDA_VISIBLE_DEVICES` entries, or every GPU `nvidia-smi -L` lists;
  the job takes an exclusive non-blocking `flock` on `<lock dir>/<gpu>.lock` for the first free one,
  keeps the file descriptor open for the life of the process (the kernel drops the lock when the
  process dies, however it dies) and sets `CUDA_VISIBLE_DEVICES` to that GPU alone. When every
  candidate is held it waits, saying so, and fails after `E1_GPU_WAIT_S` seconds.

Environment: `E1_GPU_LOCK_DIR` (lock directory; default /tmp/e1-gpu-locks-<uid>, must be on a local
file system shared by the jobs of one node), `E1_GPU_WAIT_S` (how long to wait for a free GPU; default
3600). Test hook: `E1_GPU_CLAIM_ON_CPU=1` makes CPU jobs claim too (the CLI then claims for any device),
so the claim path can be exercised without a GPU; never set it for real measurements.

CPU: a job that times (or loads) the CPU takes an exclusive `flock` on `<cpu lock dir>/host.lock` and
holds it until it ends, so CPU measurements of two snakemake instances on one host never overlap; a job
that finds the lock held waits, saying by whom (`E1_CPU_LOCK_DIR`, default /tmp/e1-cpu-locks-<uid>).

No torch import here: importing this module cannot initialise CUDA.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, MutableMapping

from e1.jobs import nvsmi
from e1.jobs.nvsmi import Gpu

LOCK_DIR_ENV = "E1_GPU_LOCK_DIR"
WAIT_ENV = "E1_GPU_WAIT_S"
TEST_HOOK_ENV = "E1_GPU_CLAIM_ON_CPU"
CPU_LOCK_DIR_ENV = "E1_CPU_LOCK_DIR"
DEFAULT_WAIT_S = 3600.0
PROGRESS_EVERY_S = 30.0



class ClaimError(RuntimeError):
    """No GPU could be claimed (bad environment, or none freed in time)."""


@dataclass
class Claim:
    source: str  # "lock": claimed here; "slurm" / "single": pinned already, left alone
    gpu: Gpu
    cuda_visible_devices_before: str | None
    candidates: list[str] = field(default_factory=list)
    lock_file: str | None = None
    waited_s: float = 0.0
    claimed_at: float = 0.0  # time.time()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("gpu"))
        return d


_claim: Claim | None = None
_cpu_claim: dict[str, Any] | None = None
_held_fds: list[int] = []  # never closed: closing would release the lock before the process ends


def _log(msg: str) -> None:
    print(f"[e1 {time.strftime('%H:%M:%S')}] gpu claim: {msg}", file=sys.stderr, flush=True)


def _match(entry: str, listed: list[Gpu]) -> Gpu:
    """A CUDA_VISIBLE_DEVICES entry, with index/UUID filled in from nvidia-smi when it names a listed GPU."""
    for g in listed:
        if entry == g.index or (entry.startswith("GPU-") and g.uuid and g.uuid.startswith(entry)):
            return Gpu(id=entry, index=g.index, uuid=g.uuid, name=g.name)
    return Gpu(id=entry, index=entry if entry.isdigit() else None, uuid=entry if entry.startswith("GPU-") else None)


def candidates(environ: MutableMapping[str, str], listed: list[Gpu] | None) -> list[Gpu]:
    """The GPUs this job may use: the CUDA_VISIBLE_DEVICES entries if set, else every GPU nvidia-smi lists."""
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        entries = [e.strip() for e in cvd.split(",") if e.strip()]
        if not entries:
            raise ClaimError(f"CUDA_VISIBLE_DEVICES is set but names no GPU ({cvd!r}): this job can see no GPU; "
                             "unset it to use every GPU nvidia-smi lists, or name the GPUs (e.g. 0,1)")
        return [_match(e, listed or []) for e in entries]
    if listed is None:
        raise ClaimError("cannot enumerate the GPUs: nvidia-smi is not on PATH (or failed) and CUDA_VISIBLE_DEVICES "
                         "is unset; set CUDA_VISIBLE_DEVICES to the GPUs the jobs may share (e.g. 0,1)")
    if not listed:
        raise ClaimError("nvidia-smi -L lists no GPU on this machine; nothing to claim")
    return listed  # id = UUID: unambiguous whatever CUDA_DEVICE_ORDER is


def default_lock_dir(kind: str = "gpu") -> Path:
    return Path("/tmp") / f"e1-{kind}-locks-{os.getuid()}"


def _lock_dir(environ: MutableMapping[str, str], lock_dir: str | Path | None, kind: str = "gpu") -> Path:
    var = LOCK_DIR_ENV if kind == "gpu" else CPU_LOCK_DIR_ENV
    chosen = lock_dir or environ.get(var)
    d = Path(chosen) if chosen else default_lock_dir(kind)
    what = "GPU" if kind == "gpu" else "CPU"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700 if not chosen else 0o777)
    except OSError as e:
        raise ClaimError(f"cannot create the {what} lock directory {str(d)!r}: {e.strerror}; set {var} to a "
                         "writable directory on a local file system") from e
    if not d.is_dir():
        raise ClaimError(f"{what} lock directory {str(d)!r} is not a directory; set {var} to a directory")
    if not chosen and d.stat().st_uid != os.getuid():
        raise ClaimError(f"{what} lock directory {str(d)!r} belongs to uid {d.stat().st_uid}, not to this user "
                         f"(uid {os.getuid()}); set {var} to a directory of your own")
    return d


def _lock_name(g: Gpu) -> str:
    key = g.uuid or g.id
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by child processes (PEP 446)
    except OSError as e:
        raise ClaimError(f"cannot open GPU lock file {str(path)!r}: {e.strerror}; set {LOCK_DIR_ENV} to a writable "
                         "directory on a local file system") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        raise ClaimError(f"cannot lock {str(path)!r}: {e.strerror} (flock needs a local file system; set "
                         f"{LOCK_DIR_ENV})") from e
    return fd


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']} since {time.strftime('%H:%M:%S', time.localtime(h['claimed_at']))}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def _wait_limit(environ: MutableMapping[str, str], wait_s: float | None) -> float:
    if wait_s is not None:
        return float(wait_s)
    raw = environ.get(WAIT_ENV)
    if raw is None or raw == "":
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ClaimError(f"{WAIT_ENV}={raw!r} is not a number of seconds >= 0")
    return value


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def claim(environ: MutableMapping[str, str] | None = None, lock_dir: str | Path | None = None,
          wait_s: float | None = None, poll_s: float = 0.5, log: Callable[[str], None] = _log) -> Claim:
    """Claim one GPU for this process (see the module docstring); idempotent within a process."""
    global _claim
    if _claim is not None:
        return _claim
    environ = os.environ if environ is None else environ
    if _cuda_initialised():
        raise ClaimError("CUDA was initialised before the GPU claim: CUDA_VISIBLE_DEVICES can no longer take effect; "
                         "claim the GPU before any torch.cuda call")
    before = environ.get("CUDA_VISIBLE_DEVICES")
    cands = candidates(environ, nvsmi.list_gpus())
    names = [c.id for c in cands]
    if len(cands) == 1:
        source = "slurm" if environ.get("SLURM_JOB_ID") and before is not None else "single"
        _claim = Claim(source=source, gpu=cands[0], cuda_visible_devices_before=before, candidates=names,
                       claimed_at=time.time())
        log(f"one GPU visible ({cands[0].id}, {source}): pinned already, nothing to claim")
        return _claim

    limit = _wait_limit(environ, wait_s)
    d = _lock_dir(environ, lock_dir)
    t0 = time.monotonic()
    next_note = 0.0
    while True:
        for g in cands:
            path = d / _lock_name(g)
            fd = _try_lock(path)
            if fd is None:
                continue
            _held_fds.append(fd)
            waited = time.monotonic() - t0
            _claim = Claim(source="lock", gpu=g, cuda_visible_devices_before=before, candidates=names,
                           lock_file=str(path), waited_s=round(waited, 3), claimed_at=time.time())
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "gpu": g.id,
                                     "claimed_at": _claim.claimed_at}).encode())
            environ["CUDA_VISIBLE_DEVICES"] = g.id
            if g.id.isdigit():  # an index: make CUDA count GPUs the way nvidia-smi does
                environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            log(f"claimed GPU {g.id} (index {g.index}, uuid {g.uuid}) of {names} after {waited:.1f} s; "
                f"lock {path} held until this process ends")
            return _claim
        waited = time.monotonic() - t0
        held = "; ".join(f"{g.id}: {_holder(d / _lock_name(g))}" for g in cands)
        if waited >= limit:
            raise ClaimError(f"no GPU became free within {limit:g} s: all {len(cands)} candidates stay claimed "
                             f"({held}; lock dir {d}); raise {WAIT_ENV}, or run fewer GPU jobs at once "
                             "(--resources gpu=K with K at most the number of GPUs)")
        if waited >= next_note:
            log(f"all {len(cands)} GPUs are claimed by other jobs ({held}); waited {waited:.0f} s of "
                f"{limit:g} s (lock dir {d})")
            next_note = waited + PROGRESS_EVERY_S if next_note else PROGRESS_EVERY_S
        time.sleep(poll_s)


def claim_cpu(environ: MutableMapping[str, str] | None = None, lock_dir: str | Path | None = None,
              wait_s: float | None = None, poll_s: float = 0.5, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Hold this host's CPU-measurement lock until the process ends (waiting while another job holds it)."""
    global _cpu_claim
    if _cpu_claim is not None:
        return _cpu_claim
    environ = os.environ if environ is None else environ
    limit = _wait_limit(environ, wait_s)
    path = _lock_dir(environ, lock_dir, "cpu") / "host.lock"
    t0 = time.monotonic()
    next_note = 0.0
    while (fd := _try_lock(path)) is None:
        waited = time.monotonic() - t0
        if waited >= limit:
            raise ClaimError(f"the host's CPU-measurement lock {path} stayed held ({_holder(path)}) for {limit:g} s; "
                             f"CPU measurements of another snakemake run are still going; raise {WAIT_ENV} or wait")
        if waited >= next_note:
            log(f"another CPU measurement holds {path} ({_holder(path)}); waiting ({waited:.0f} s of {limit:g} s) "
                "so that the two do not share the CPU")
            next_note = waited + PROGRESS_EVERY_S if next_note else PROGRESS_EVERY_S
        time.sleep(poll_s)
    _held_fds.append(fd)
    _cpu_claim = {"lock_file": str(path), "waited_s": round(time.monotonic() - t0, 3), "claimed_at": time.time()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "claimed_at": _cpu_claim["claimed_at"]}).encode())
    if _cpu_claim["waited_s"] > 1:
        log(f"CPU-measurement lock {path} taken after {_cpu_claim['waited_s']:.0f} s")
    return _cpu_claim


def claim_for(device: str) -> Claim | None:
    """The one call a device job makes first: claim a GPU when the job runs on `cuda` (no index given);
    on the CPU, take the host's CPU-measurement lock (CPU timing jobs never overlap on one host).

    `cuda:N` names a device by hand and is left alone; the test hook E1_GPU_CLAIM_ON_CPU=1 makes a CPU job
    stand in for a GPU job: it claims a (fake) GPU instead of the CPU lock.
    """
    if device == "cuda" or os.environ.get(TEST_HOOK_ENV) == "1":
        return claim()
    if device == "cpu":
        claim_cpu()
    return None


def current() -> dict[str, Any] | None:
    """This process's GPU claim, for the job's artifacts (None when it claimed nothing)."""
    return _claim.as_dict() if _claim is not None else None


def current_cpu() -> dict[str, Any] | None:
    """This process's hold on the host's CPU-measurement lock (None when it took none)."""
    return _cpu_claim


def smi_id(torch_index: int) -> str:
    """The `nvidia-smi -i` argument for torch's cuda:<torch_index> (nvidia-smi ignores CUDA_VISIBLE_DEVICES)."""
    if _claim is not None and torch_index == 0:
        return _claim.gpu.uuid or _claim.gpu.index or _claim.gpu.id
    entries = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    if torch_index < len(entries):
        return entries[torch_index]
    return str(torch_index)
