"""Artifacts on disk: every write is atomic, every read is checked and names the file.

Writes go to a temporary file in the target's directory and are renamed into place only when complete,
so a failed job (out of disk, killed) never leaves a partial artifact behind. Reads fail with
`ArtifactError`, naming the file, the key, the value found and what to do about it.
No torch import: the analysis rules use this module.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator


class ArtifactError(ValueError):
    """An artifact a job reads is missing, unreadable, or holds a value it cannot use."""


def rebuild_hint(path: str | Path, rule: str | None) -> str:
    """What a user does about a bad artifact made by `rule` (None: a file the user provides)."""
    if rule is None:
        return "fix or replace that file"
    return (f"delete {path} and run snakemake again to rebuild it (rule {rule}), or rebuild every output of "
            f"that rule with `snakemake --forcerun {rule}`")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed when it fails.

    suffix: ending the temporary name must have for the writer (e.g. ".json.gz" makes torch gzip a trace).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _nonfinite(obj: Any, where: str = "") -> str | None:
    """The dotted key of the first NaN or infinite float in obj (None if there is none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _nonfinite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Indented JSON, atomically; a NaN or infinity is refused (JSON has none), naming its key."""
    bad = _nonfinite(obj)
    if bad:
        raise ValueError(f"refusing to write {path}: {bad} is not a finite number")
    write_text(path, json.dumps(obj, indent=1) + "\n")


def _no_constants(name: str) -> float:
    raise ValueError(f"holds {name}, which is not a number JSON allows")


def read_json(path: str | Path, rule: str | None) -> Any:
    """Parse a JSON artifact made by `rule` (None: given by the user); missing, truncated or NaN-holding files
    are ArtifactErrors."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        made = f"rule {rule} makes it; run snakemake to build it" if rule else "expected here"
        raise ArtifactError(f"{p}: no such file ({made})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p}: cannot be read ({e}); {rebuild_hint(p, rule)}") from None
    if not text.strip():
        raise ArtifactError(f"{p}: empty file; {rebuild_hint(p, rule)}")
    try:
        return json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}: truncated or "
                            f"corrupted?); {rebuild_hint(p, rule)}") from None
    except ValueError as e:
        raise ArtifactError(f"{p}: {e}; {rebuild_hint(p, rule)}") from None


def read_parquet(path: str | Path, rule: str, columns: list[str] | None = None):
    """A Parquet artifact made by `rule` as a pandas DataFrame; an unreadable file is an ArtifactError."""
    import pandas as pd  # not at import time: planning imports this module

    try:
        return pd.read_parquet(path, columns=columns)
    except Exception as e:  # pyarrow raises several types for missing, truncated or foreign files
        raise ArtifactError(f"{path}: cannot be read as Parquet ({type(e).__name__}: {e}); "
                            f"{rebuild_hint(path, rule)}") from None


class Record:
    """A parsed JSON object with checked access: a bad key or value raises an ArtifactError naming the
    file, the dotted key and the value."""

    def __init__(self, data: Any, path: str | Path, rule: str | None, key: str = ""):
        self.data, self.path, self.rule, self.key = data, Path(path), rule, key

    @classmethod
    def load(cls, path: str | Path, rule: str | None) -> Record:
        rec = cls(read_json(path, rule), path, rule)
        rec.expect(dict)
        return rec

    def fail(self, problem: str, key: str | None = None) -> ArtifactError:
        where = key if key is not None else self.key
        return ArtifactError(f"{self.path}: {where or 'the file'} {problem}; {rebuild_hint(self.path, self.rule)}")

    def expect(self, kind: type | tuple[type, ...]) -> Any:
        if not isinstance(self.data, kind) or (isinstance(self.data, bool) and kind in (int, float, (int, float))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(f"is {self.data!r:.80}, expected a {names}")
        return self.data

    def __getitem__(self, key: str | int) -> Record:
        """The record at `key` (a dict key or list index), which must exist."""
        full = f"{self.key}.{key}" if self.key else str(key)
        container = self.data
        try:
            value = container[key]
        except (KeyError, IndexError, TypeError):
            raise self.fail("is missing", full) from None
        return Record(value, self.path, self.rule, full)

    def require(self, *keys: str) -> None:
        """Each of `keys` must be present."""
        for k in keys:
            self[k]

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value at `key`, or default when absent (unchecked)."""
        return self.data.get(key, default) if isinstance(self.data, dict) else default

    def has(self, key: str) -> bool:
        return isinstance(self.data, dict) and key in self.data

    def number(self, key: str, minimum: float | None = 0.0) -> float:
        """A finite number at `key`, at least `minimum` (None: no bound)."""
        rec = self[key]
        v = rec.data
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise rec.fail(f"is {v!r:.80}, expected a finite number")
        if minimum is not None and v < minimum:
            raise rec.fail(f"is {v!r}, expected a number >= {minimum:g}")
        return float(v)

    def items(self, key: str, nonempty: bool = True) -> list[Record]:
        """The list at `key` as records; an empty list fails when `nonempty`."""
        rec = self[key]
        rec.expect(list)
        if nonempty and not rec.data:
            raise rec.fail("is an empty list: nothing to work with")
        return [rec[i] for i in range(len(rec.data))]
