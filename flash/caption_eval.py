"""How often the default model's caption names the subject of a real photo it has never seen."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from flash.decoding import GenerationConfig, collect, generate
from flash.media import load_media

LABELS = Path(__file__).resolve().parent.parent / "assets" / "caption_eval.json"


def labelled_photos() -> list[dict]:
    """The labelled set, with absolute paths of the photos that exist on this machine."""
    out = []
    for item in json.loads(LABELS.read_text())["photos"]:
        spec = importlib.util.find_spec(item["package"])
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / item["path"]
        if path.exists():
            out.append({**item, "file": path})
    return out


def evaluate_captions(target, max_new_tokens: int = 64, log=print) -> dict:
    """Caption each labelled photo greedily; report which captions name the subject."""
    rows = []
    for item in labelled_photos():
        media = load_media(item["file"])
        prompt = target.build_prompt(media, target.default_prompt(media))
        config = GenerationConfig(max_new_tokens=max_new_tokens, rules=target.logits_rules())
        text = target.decode(list(collect(generate(target, prompt, "ar", None, config)).tokens))
        hit = any(w in text.lower() for w in item["words"])
        rows.append({"photo": item["path"], "subject": item["subject"], "named": hit, "caption": text})
        log(f"{'OK ' if hit else 'MISS'} {item['subject']:>20}: {text[:100]!r}")
    named = sum(r["named"] for r in rows)
    return {"named": named, "total": len(rows), "rate": named / len(rows) if rows else 0.0, "rows": rows}
