"""Gradio app: race plain autoregressive decoding against FLASH on an image or a video.

UI only: media goes through :func:`flash.media.load_media`, models through :mod:`flash.models`,
and the race itself is :func:`flash.race.race`. Both sides run interleaved in one worker, each on
its own clock; the display replays them on one shared clock (:func:`flash.race.on_one_clock`), so
at every moment both panels show where each side was after the same amount of its own time. The
two sides share this machine, so that clock runs at about half of wall speed while both decode
and at full speed once one has finished; it never runs ahead of wall time.

Run with ``python app.py`` (127.0.0.1:7860; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import plotly.graph_objects as go
import torch

from flash.decoding import DEFAULT_MIN_DRAFT_PROB, GenerationConfig
from flash.media import Media, MediaError, is_video_path, load_media
from flash.models import DEFAULT_MODEL, PRESETS, Preset, load_draft, load_target
from flash.race import RaceFrame, SideView, on_one_clock, race

try:  # HuggingFace Spaces (ZeroGPU): the race runs inside a GPU allocation
    import spaces
except ImportError:
    spaces = None

_log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
ORANGE, BLUE, GREY = "#f97316", "#60a5fa", "#6b7280"
ORIGIN_COLORS = {"accepted": ORANGE, "target": BLUE}  # EAGLE's web UI convention: accepted = orange
TEXT_EVERY_S = 0.05  # stream text at most this often (wall time) ...
FIGURE_EVERY_S = 0.25  # ... and the charts, which are slower to send and draw; the last frame always
MAX_K = 8
# FLASH's highlighted pieces as running text: gradio draws each piece as a separate pill and may break
# words anywhere; pieces keep their own spaces.
CSS = """
#flash-text .textfield { line-height: 1.8; word-break: normal; overflow-wrap: break-word; padding: 4px 2px; }
#flash-text .token-container, #flash-text .token { margin: 0; padding: 1px 0; border-radius: 0; }
"""

# ---------------------------------------------------------------------------------------------
# Models


_LOAD_LOCK = threading.Lock()  # page loads and races may ask for a model at the same time
_DRAFTS: dict[tuple[str, str | None], Any] = {}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is meant for the user, shown as is."""
    from flash.draft import DraftError
    from flash.hf_targets import TargetLoadError
    from flash.weights import WeightsError

    return (MediaError, DraftError, WeightsError, TargetLoadError, ValueError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _preset(model: str | None) -> Preset:
    """The preset picked in the dropdown (its target id; a label is accepted too)."""
    for preset in PRESETS:
        if model in (preset.target, preset.label):
            return preset
    raise gr.Error(f"Unknown model {model!r}; choose one of: {', '.join(p.target for p in PRESETS)}.")


def _needs_missing_gpu(preset: Preset) -> bool:
    """Hub models are 7B LMMs: on a CPU-only machine they would not fit or would crawl."""
    return preset.target != DEFAULT_MODEL and not torch.cuda.is_available()


def _draft_path(preset: Preset) -> str | None:
    """The preset's trained draft when it is present here, else None (an untrained draft)."""
    return preset.draft if preset.draft and Path(preset.draft).exists() else None


def _load_models(preset: Preset):
    """(target, draft) for ``preset``, loaded once per process."""
    if _needs_missing_gpu(preset):
        raise gr.Error(f"{preset.label} needs a CUDA GPU and this machine has none; pick the default model.")
    path = _draft_path(preset)
    with _LOAD_LOCK:
        target = load_target(preset.target, quiet=True)
        key = (target.name, path)
        if key not in _DRAFTS:
            _DRAFTS[key] = load_draft(target, path, quiet=True)
    return target, _DRAFTS[key]


def _draft_note(preset: Preset) -> str:
    if _draft_path(preset):
        return "trained draft"
    return "untrained draft: the output is still exact, but few drafts are accepted (train one for a speed-up)"


def prepare(model: str) -> Iterator[tuple[str, Any]]:
    """Load the chosen model when the page opens or the choice changes; fit the k slider to its draft."""
    preset = _preset(model)
    if _needs_missing_gpu(preset):
        gr.Warning(f"{preset.label} needs a CUDA GPU; this machine has none.")
        yield f"⚠ {preset.label} needs a CUDA GPU and this machine has none; pick the default model.", gr.skip()
        return
    yield f"… Loading {preset.label} (once per server; the first time may take a minute)", gr.skip()
    try:
        _, draft = _load_models(preset)
    except _user_errors() as exc:
        gr.Warning(_one_line(exc))
        yield f"✗ {_one_line(exc)}", gr.skip()
        return
    k = draft.cfg.k
    yield (f"✓ Ready: {preset.label} · {_draft_note(preset)} · k = {k} draft tokens per step",
           gr.Slider(maximum=k, value=k))


# ---------------------------------------------------------------------------------------------
# Inputs


def _media(path: str | None) -> Media:
    if not path:
        raise gr.Error("Upload an image or a video first (or click one of the examples).")
    try:
        return load_media(path)
    except MediaError as exc:
        raise gr.Error(_one_line(exc)) from None


def preview(path: str | None) -> tuple[Any, Any]:
    """Show the uploaded file in an image or a video player (cheap: judged by its first bytes)."""
    if not path:
        return gr.Image(value=None, visible=False), gr.Video(value=None, visible=False)
    video = is_video_path(path)
    return (gr.Image(value=None if video else path, visible=not video),
            gr.Video(value=path if video else None, visible=video))


class _Cancels:
    """One cancel Event per browser session: Stop ends that session's race."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, key: str) -> threading.Event:
        with self._lock:
            event = self._events[key] = threading.Event()
        return event

    def finish(self, key: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(key) is event:
                del self._events[key]

    def cancel(self, key: str) -> bool:
        with self._lock:
            event = self._events.get(key)
        if event is not None:
            event.set()
        return event is not None


_CANCELS = _Cancels()


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or f"anonymous-{uuid.uuid4()}"


# ---------------------------------------------------------------------------------------------
# Rendering


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.01, "font": {"size": 14}}, template="plotly_white", height=280,
                      margin={"l": 50, "r": 15, "t": 40, "b": 40}, xaxis_title=x_title, yaxis_title=y_title,
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1,
                              "font": {"size": 11}})
    return fig


def acceptance_figure(flash: SideView, k: int) -> go.Figure:
    """Stacked bars per FLASH step: accepted drafts (orange) + the target's own token, under the k+1 line."""
    per_step, accepted = flash.tokens_per_step[1:], flash.accepted_per_step[1:]
    steps = list(range(1, len(per_step) + 1))
    fig = go.Figure()
    fig.add_bar(x=steps, y=list(accepted), name="accepted draft tokens", marker_color=ORANGE)
    fig.add_bar(x=steps, y=[n - a for n, a in zip(per_step, accepted, strict=True)], name="target's own token",
                marker_color=BLUE)
    fig.add_hline(y=k + 1, line_dash="dash", line_color=GREY, annotation_text=f"k+1 = {k + 1}",
                  annotation_position="top left")
    fig.update_layout(barmode="stack", yaxis_range=[0, k + 1.6], bargap=0.15)
    return _layout(fig, "Tokens per FLASH step", "FLASH step (one target pass each)", "tokens")


def speed_figure(baseline: SideView, flash: SideView) -> go.Figure:
    """Tokens per second so far, against each side's own clock."""
    fig = go.Figure()
    for view, name, color in ((baseline, "autoregressive", GREY), (flash, "FLASH", ORANGE)):
        fig.add_scatter(x=list(view.times), y=[round(r, 3) for r in view.rates], mode="lines+markers",
                        name=name, line_color=color, marker_size=4)
    return _layout(fig, "Tokens per second", "own-clock seconds", "tokens / s")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _side_line(view: SideView, title: str, flash: bool = False) -> str:
    if not view.times:
        return f"**{title}** · waiting…"
    parts = [f"**{title}**", _count(len(view.tokens), "token"), f"{view.seconds:.2f} s",
             f"{view.tokens_per_s:.1f} tokens/s"]
    if flash and view.steps:  # the baseline's steps are its tokens
        parts[2:2] = [_count(view.steps, "step"), f"τ {(len(view.tokens) - 1) / view.steps:.2f}"]
    return " · ".join(parts) + (" ✓" if view.done else "")


def _verdict(summary: dict[str, Any]) -> str:
    if summary["identical"] is True:
        return "✓ identical output (temperature 0: FLASH must reproduce the baseline token for token)"
    if summary["identical"] is False:
        return f"✗ differs at token {summary['first_difference']}"
    if summary["temperature"] > 0:
        return (f"sampling at temperature {summary['temperature']:g}: the outputs differ by design; "
                "FLASH keeps the target's distribution")
    return "exactness unknown: the race was stopped before the end"


def _final_status(summary: dict[str, Any]) -> str:
    if summary["cancelled"]:
        return "■ Stopped."
    speedup = "" if summary["speedup"] is None else f": FLASH {summary['speedup']:.2f}× the baseline's speed"
    check = {True: ", identical output ✓", False: f", differs at token {summary['first_difference']} ✗"}
    return f"Finished{speedup}{check.get(summary['identical'], '')}"


def summary_markdown(summary: dict[str, Any], note: str) -> str:
    base, flash = summary["baseline"], summary["flash"]
    speedup = summary["speedup"]
    if summary["cancelled"]:
        head = "### ■ Stopped"
    elif speedup is None:
        head = "### Finished"
    else:
        head = f"### ⚡ FLASH {speedup:.2f}× {'faster' if speedup >= 1 else '(slower)'} than autoregressive"
    rows = [
        "| | autoregressive | FLASH |",
        "|---|---:|---:|",
        f"| new tokens | {base['new_tokens']} | {flash['new_tokens']} |",
        f"| steps after the prefill (target passes) | {base['steps']} | {flash['steps']} |",
        f"| own-clock seconds | {base['seconds']:.2f} | {flash['seconds']:.2f} |",
        f"| tokens / s | {base['tokens_per_s']:.1f} | {flash['tokens_per_s']:.1f} |",
    ]
    tau, rate = summary["tau"], summary["acceptance_rate"]
    stats = (f"τ (tokens per target pass, counting the target's own token) **{tau:.2f}** · acceptance rate "
             f"**{100 * rate:.0f} %** of the drafts proposed (k = {summary['k']}"
             f"{', a draft tree' if summary.get('method') == 'flash-tree' else ''})") if tau is not None else ""
    return "\n".join([head, "", *rows, "", stats, "", _verdict(summary), "", f"<small>{note}</small>"])


def _frame_outputs(frame: RaceFrame, k: int, figures: bool) -> dict[str, Any]:
    out = {
        "ar_stats": _side_line(frame.baseline, "Autoregressive"),
        "ar_text": frame.baseline.text,
        "flash_stats": _side_line(frame.flash, "FLASH", flash=True),
        "flash_text": list(frame.flash.segments),
    }
    if figures:
        out["accept_plot"] = acceptance_figure(frame.flash, k)
        out["speed_plot"] = speed_figure(frame.baseline, frame.flash)
    return out


# ---------------------------------------------------------------------------------------------
# The race handler

RACING = "⏱ Racing: both panels show each side after the same amount of its own time"
OUTPUTS = ("status", "ar_stats", "ar_text", "flash_stats", "flash_text", "accept_plot", "speed_plot",
           "summary_md", "summary_json")


def _pack(values: dict[str, Any]) -> tuple[Any, ...]:
    """Output tuple in OUTPUTS order; components not named keep their value."""
    return tuple(values.get(name, gr.skip()) for name in OUTPUTS)


def run_race(media_path: str | None, prompt: str, model: str, max_new_tokens: float, temperature: float,
             top_p: float, k: float, seed: float, request: gr.Request = None) -> Iterator[tuple[Any, ...]]:
    """Race autoregressive decoding against FLASH, streaming both texts, the charts and a summary."""
    key = _session(request)
    cancel = _CANCELS.start(key)
    try:
        yield from _race_stream(media_path, prompt or "", model, max_new_tokens, temperature, top_p, k, seed,
                                cancel)
    except gr.Error as exc:
        yield _pack({"status": f"✗ {exc.message}"})
        raise
    except _user_errors() as exc:
        yield _pack({"status": f"✗ {_one_line(exc)}"})
        raise gr.Error(_one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the server stays up; the user gets one line, the log the rest
        _log.exception("race failed")
        message = f"The model failed ({type(exc).__name__}: {_one_line(exc)[:200]})."
        yield _pack({"status": f"✗ {message}"})
        raise gr.Error(message) from None
    finally:
        _CANCELS.finish(key, cancel)


def _race_stream(media_path, prompt, model, max_new_tokens, temperature, top_p, k, seed,
                 cancel: threading.Event) -> Iterator[tuple[Any, ...]]:
    preset = _preset(model)
    media = _media(media_path)
    yield _pack({"status": f"… Loading {preset.label}", "ar_stats": "", "ar_text": "", "flash_stats": "",
                 "flash_text": [], "accept_plot": None, "speed_plot": None, "summary_md": "", "summary_json": None})
    target, draft = _load_models(preset)
    config = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                              top_p=float(top_p), seed=int(seed), k=int(k) if k else None,
                              rules=target.logits_rules(), min_draft_prob=DEFAULT_MIN_DRAFT_PROB)
    k_used = min(config.k or draft.cfg.k, draft.cfg.k)
    yield _pack({"status": "… Encoding the media and starting both sides"})
    last_text = last_figure = 0.0
    started = False
    for frame in on_one_clock(race(target, draft, media, prompt, config, cancel=cancel)):
        now = time.monotonic()
        final = frame.summary is not None
        if not final and now - last_text < TEXT_EVERY_S:
            continue
        figures = final or now - last_figure >= FIGURE_EVERY_S
        out = _frame_outputs(frame, k_used, figures)
        if not started:
            # The status is set once here and once at the end, never per frame: a frame still on its
            # way when Stop lands would otherwise overwrite Stop's "Stopped" (seen as a flaky test).
            out["status"], started = RACING, True
        last_text, last_figure = now, (now if figures else last_figure)
        if final:
            out["status"] = _final_status(frame.summary)
            out["summary_md"] = summary_markdown(frame.summary, _draft_note(preset))
            out["summary_json"] = frame.summary
        yield _pack(out)


def stop(request: gr.Request = None) -> str:
    """Stop this session's race between two steps."""
    _CANCELS.cancel(_session(request))
    return "■ Stopped."


def _on_gpu(fn):
    """On HuggingFace Spaces, run ``fn`` inside a GPU allocation; elsewhere leave it alone."""
    return spaces.GPU(duration=180)(fn) if spaces is not None else fn


# ---------------------------------------------------------------------------------------------
# Layout


def _examples() -> tuple[list[list[str]], list[str]]:
    files = sorted(EXAMPLES_DIR.glob("*.jpg")) + sorted(EXAMPLES_DIR.glob("*.mp4"))
    labels = [path.name for path in files]
    return [[str(path)] for path in files], labels


INTRO = """# ⚡ FLASH: speculative decoding for multimodal models
Plain **autoregressive** decoding (left) races **FLASH** (right) on the same model, picture or video and
settings. FLASH's small draft proposes *k* tokens at once; the target checks them in one pass and keeps the
longest correct prefix, so at temperature 0 both sides must write exactly the same text.
<span style="color:#f97316">■ orange</span>: draft tokens the target accepted ·
<span style="color:#60a5fa">■ blue</span>: the target's own tokens."""


def build_demo() -> gr.Blocks:
    """The app: inputs on the left, the race (texts, live charts, summary) on the right."""
    examples, labels = _examples()
    with gr.Blocks(title="FLASH race") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                media = gr.File(label="Image or video", type="filepath", elem_id="media")
                image_preview = gr.Image(label="Preview", interactive=False, visible=False, height=200)
                video_preview = gr.Video(label="Preview", interactive=False, visible=False, height=200)
                gr.Examples(examples, inputs=[media], example_labels=labels, label="Examples", examples_per_page=10)
                prompt = gr.Textbox(label="Prompt", placeholder="Empty: describe the image (or the video)", lines=2)
                model = gr.Dropdown([(p.label, p.target) for p in PRESETS], value=DEFAULT_MODEL, label="Model")
                with gr.Row():
                    race_button = gr.Button("▶ Race", variant="primary", elem_id="race")
                    stop_button = gr.Button("■ Stop", variant="stop", elem_id="stop")
                status = gr.Markdown("", elem_id="status")
                with gr.Accordion("Settings", open=False):
                    max_new_tokens = gr.Slider(1, 512, value=96, step=1, label="Max new tokens")
                    temperature = gr.Slider(0, 1.5, value=0, step=0.05, label="Temperature",
                                            info="0 = greedy: FLASH must then match the baseline exactly")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p")
                    k = gr.Slider(1, MAX_K, value=4, step=1, label="k: draft tokens per step",
                                  info="at most the draft's own k")
                    seed = gr.Number(0, precision=0, label="Seed")
            with gr.Column(scale=2):
                with gr.Row():
                    with gr.Column():
                        ar_stats = gr.Markdown("**Autoregressive**", elem_id="ar-stats")
                        ar_text = gr.Textbox(label="Autoregressive (baseline)", lines=9, max_lines=18,
                                             interactive=False, elem_id="ar-text")
                    with gr.Column():
                        flash_stats = gr.Markdown("**FLASH**", elem_id="flash-stats")
                        flash_text = gr.HighlightedText(label="FLASH", color_map=ORIGIN_COLORS, show_legend=True,
                                                        show_inline_category=False, elem_id="flash-text")
                with gr.Row():
                    accept_plot = gr.Plot(label="Tokens per FLASH step", elem_id="accept-plot")
                    speed_plot = gr.Plot(label="Tokens per second", elem_id="speed-plot")
                summary_md = gr.Markdown("", elem_id="summary")
                with gr.Accordion("Summary (JSON)", open=False):
                    summary_json = gr.JSON(label="Summary", elem_id="summary-json")

        outputs = {"status": status, "ar_stats": ar_stats, "ar_text": ar_text, "flash_stats": flash_stats,
                   "flash_text": flash_text, "accept_plot": accept_plot, "speed_plot": speed_plot,
                   "summary_md": summary_md, "summary_json": summary_json}
        media.change(preview, inputs=media, outputs=[image_preview, video_preview], api_visibility="private",
                     concurrency_limit=None)
        demo.load(prepare, inputs=model, outputs=[status, k], api_visibility="private")
        model.change(prepare, inputs=model, outputs=[status, k], api_visibility="private")
        race_event = race_button.click(
            _on_gpu(run_race), inputs=[media, prompt, model, max_new_tokens, temperature, top_p, k, seed],
            outputs=[outputs[name] for name in OUTPUTS], api_name="race", show_progress="minimal",
            concurrency_id="race")
        stop_button.click(stop, outputs=status, cancels=[race_event], api_name="stop", concurrency_limit=None)
    return demo.queue(default_concurrency_limit=1)


if __name__ == "__main__":
    build_demo().launch(css=CSS)
