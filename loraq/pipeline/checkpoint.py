"""Fingerprints and the workdir manifest (docs/design.md, Checkpoints).

A file's identity is its sha256; the manifest caches it under (size, mtime_ns) so unchanged files
are not re-read, and re-hashes a file whose size or mtime changed. A stage is up to date only if
its fingerprint (kind, output-affecting settings, input hashes, format version) matches and its
outputs still hash to what was recorded."""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import FORMAT_VERSION, __version__
from ..atomic import atomic_output, io_error
from ..cpus import available_cpus
from ..errors import BadArguments, BadInput

MANIFEST = "manifest.json"


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any) -> str:
    return hashlib.sha256(_canon(obj).encode()).hexdigest()


def sha256_file(p: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB pieces; an OSError becomes an IOFailure."""
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    except OSError as exc:
        raise io_error(exc, p, "read") from exc
    return h.hexdigest()


class Manifest:
    """workdir/manifest.json: per-stage records plus the file-hash cache."""

    def __init__(self, workdir: Path):
        self.path = workdir / MANIFEST
        self.data: dict[str, Any] = {"loraq_version": __version__, "format_version": FORMAT_VERSION, "stages": {}, "files": {}}
        if self.path.exists():
            if not self.path.is_file():  # a FIFO here would block the read
                raise BadInput(f"{self.path} is not a regular file; delete it to rebuild every stage")
            try:
                loaded = json.loads(self.path.read_text())
            except (OSError, ValueError, RecursionError) as exc:
                raise BadInput(f"{self.path} is damaged ({exc}); delete it to rebuild every stage") from exc
            problem = _manifest_problem(loaded)
            if problem:
                raise BadInput(f"{self.path} is damaged ({problem}); delete it to rebuild every stage")
            self.data.update(loaded)
        self._saved = _canon(self.data) if self.path.exists() else None

    @property
    def stages(self) -> dict[str, Any]:
        return self.data["stages"]

    def file_hash(self, p: Path) -> str:
        """sha256 of a file (or of a folder's files, in name order), cached by size and mtime."""
        p = Path(p)
        if p.is_dir():
            return digest({c.name: self.file_hash(c) for c in sorted(p.iterdir()) if c.is_file() and not c.name.startswith(".")})
        try:
            st = p.stat()
        except OSError as exc:
            raise io_error(exc, p, "read") from exc
        if not stat.S_ISREG(st.st_mode):  # never open a FIFO or a device: reading it would block
            raise BadArguments(f"{p} is not a regular file; give a file")
        key = str(p.resolve())
        hit = self.data["files"].get(key)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            return hit["sha256"]
        h = sha256_file(p)
        self.data["files"][key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h}
        return h

    def save(self) -> None:
        """Write the manifest atomically, and only when its content changed."""
        text = _canon(self.data)
        if text == self._saved:
            return
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True, default=str) + "\n")
        self._saved = text


def _manifest_problem(data: Any) -> str | None:
    """What is wrong with a loaded manifest's structure, or None: every part the code reads must
    have the type it expects, so a damaged file is reported rather than crashing a run."""
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    for part in ("stages", "files"):
        if not isinstance(data.get(part, {}), dict):
            return f"'{part}' is not an object"
    for key, entry in data.get("files", {}).items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("mtime_ns"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            return f"files entry {key!r} is not a size/mtime_ns/sha256 record"
    for name, rec in data.get("stages", {}).items():
        if not isinstance(rec, dict):
            return f"stage {name!r} is not an object"
        for part in ("inputs", "outputs", "settings"):
            if not isinstance(rec.get(part, {}), dict):
                return f"stage {name!r}: '{part}' is not an object"
        for out, o in rec.get("outputs", {}).items():
            if not isinstance(o, dict):
                return f"stage {name!r}: output {out!r} is not an object"
    return None


@dataclass
class Verdict:
    up_to_date: bool
    reason: str  # "up-to-date" or one of docs/design.md's reasons


def check_stage(m: Manifest, name: str, settings: dict, inputs: dict[str, str], outputs: list[Path]) -> Verdict:
    rec = m.stages.get(name)
    if rec is None:
        return Verdict(False, "no-checkpoint")
    if rec.get("format_version") != FORMAT_VERSION or rec.get("loraq_version") != __version__:
        return Verdict(False, "version-changed")
    if rec.get("settings_hash") != digest(settings):
        return Verdict(False, "settings-changed")
    old_inputs = rec.get("inputs", {})
    for k, h in inputs.items():
        if old_inputs.get(k) != h:
            return Verdict(False, f"input-changed:{k}")
    if set(old_inputs) != set(inputs):
        return Verdict(False, "settings-changed")
    for out in outputs:
        if not out.exists():
            return Verdict(False, "output-missing")
    recorded = rec.get("outputs", {})
    for out in outputs:
        r = recorded.get(out.name)
        if r is None or r.get("sha256") != m.file_hash(out):
            return Verdict(False, "output-modified")
    return Verdict(True, "up-to-date")


def record_stage(m: Manifest, name: str, kind: str, settings: dict, inputs: dict[str, str], outputs: list[Path], seconds: float) -> None:
    m.stages[name] = {
        "kind": kind,
        "fingerprint": digest({"kind": kind, "settings": settings, "inputs": inputs, "format": FORMAT_VERSION}),
        "settings": settings,
        "settings_hash": digest(settings),
        "inputs": inputs,
        "outputs": {o.name: {"sha256": m.file_hash(o), "size": o.stat().st_size} for o in outputs},
        "seconds": round(seconds, 3),
        "loraq_version": __version__,
        "format_version": FORMAT_VERSION,
    }


def cpu_threads(requested: int) -> int:
    """`requested`, or for 0 the CPUs this process may use (affinity and cgroup quota: loraq.cpus)."""
    return requested if requested > 0 else available_cpus()
