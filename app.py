"""Gradio app: race plain autoregressive decoding against FLASH on an image or a video.

UI only: media goes through :mod:`flash.media`, models through :mod:`flash.models` (the one model
cache), the race itself is :func:`flash.race.race` and its replay for slides :mod:`flash.replay`.
Both sides run interleaved in one worker, each on its own clock; the display replays them on one
shared clock (:func:`flash.race.on_one_clock`), so at every moment both panels show where each side
was after the same amount of its own time. The two sides share this machine, so that clock runs at
about half of wall speed while both decode and at full speed once one has finished; it never runs
ahead of wall time.

At start-up (``python app.py``) a background warm-up fetches and converts the default model's
weights, builds FLASH's CPU kernels, runs one short race and then a few warm races on an example
(:class:`Warmup`): their median speed-up is what this machine typically gives, shown beside each
race's own figure, and their autoregressive step time tells when a later race ran on a busy machine.
The page shows the warm-up's progress; a race asked for meanwhile waits for it rather than paying
for it.

Run with ``python app.py`` (127.0.0.1:7860; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override;
FLASH_CALIBRATION_RACES sets the number of warm races, 0 for none). ``?present=1`` in the URL opens
presentation mode.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import plotly.graph_objects as go
import torch
from PIL import Image

from flash.engine import DEFAULT_MIN_DRAFT_PROB, GenerationConfig
from flash.media import Media, MediaError, browser_preview, load_media
from flash.models import DEFAULT_MODEL, PRESETS, Preset, load_draft, load_target
from flash.race import RaceFrame, RaceRecorder, RaceRecording, SideView, difference_words, on_one_clock, race
from flash.replay import RaceReplay, machine_line, write_card, write_gif, write_video

try:  # HuggingFace Spaces (ZeroGPU): the race runs inside a GPU allocation
    import spaces
except ImportError:
    spaces = None

_log = logging.getLogger("flash.app")

# load_media refuses any image over its own pixel limit, which is below the size at which Pillow
# warns, with a one-line message; Pillow's DecompressionBombWarning would only repeat it in the log.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
CALIBRATION_MEDIA = EXAMPLES_DIR / "cat.jpg"
CALIBRATION_TOKENS = 96  # the page's default length: a typical figure for the race most visitors run
DISTURBED_STEP_RATIO = 1.5  # an autoregressive step this much slower (or faster) than calibrated: disturbed
ORANGE, BLUE, GREY = "#f97316", "#60a5fa", "#6b7280"
ORIGIN_COLORS = {"accepted": ORANGE, "target": BLUE}  # EAGLE's web UI convention: accepted = orange
TEXT_EVERY_S = 0.05  # stream text at most this often (wall time) ...
FIGURE_EVERY_S = 0.25  # ... and the charts, which are slower to send and draw; the last frame always
MAX_K = 8
BROWSER_IMAGES = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "AVIF"})  # what an <img> shows as is
_FILES = Path(tempfile.mkdtemp(prefix="flash-app-"))  # previews and replays handed to the browser
CSS = """
/* FLASH's highlighted pieces as running text: gradio draws each piece as a separate pill and may
   break words anywhere; pieces keep their own spaces. */
#flash-text .textfield { line-height: 1.8; word-break: normal; overflow-wrap: break-word; padding: 4px 2px; }
#flash-text .token-container, #flash-text .token { margin: 0; padding: 1px 0; border-radius: 0; }
/* Phones: table headers whole ("FLASH", not "FLA/SH"); the first column's labels wrap instead. */
#summary th { white-space: nowrap; word-break: keep-all; overflow-wrap: normal; }
/* The model's name stops before the dropdown's arrow instead of running under it. */
#model input { padding-right: 2.2em !important; text-overflow: ellipsis; }
/* Presentation mode: large type, the two captions and the headline only. (Gradio also adds a copy of
   each rule scoped inside its container, where body never matches: the rules key on body's class.) */
body:not(.flash-present) .flash-present-only { display: none !important; }
body.flash-present .flash-full { display: none !important; }
body.flash-present #ar-text textarea, body.flash-present #flash-text .textfield { font-size: 30px !important;
  line-height: 1.5 !important; }
body.flash-present #headline { font-size: 30px; }
body.flash-present #headline h2 { font-size: 48px; margin: 0.2em 0; }
body.flash-present #race { font-size: 24px; min-height: 3em; }
"""
# Presentation mode from the URL (?present=1) and a key press (Space or Enter outside a text field)
# starting the race there.
HEAD_JS = """
<script>
document.addEventListener('keydown', (event) => {
  if (!document.body.classList.contains('flash-present')) return;
  const tag = (event.target.tagName || '').toLowerCase();
  if (tag === 'input' || tag === 'textarea' || event.repeat) return;
  if (event.key === ' ' || event.key === 'Enter') {
    event.preventDefault();
    document.querySelector('#race')?.click();
  }
});
</script>
"""
PRESENT_FROM_URL_JS = """() => {
  const on = new URLSearchParams(window.location.search).get('present') === '1';
  document.body.classList.toggle('flash-present', on);
  return on;
}"""
PRESENT_TOGGLE_JS = "(on) => { document.body.classList.toggle('flash-present', on); return []; }"

# ---------------------------------------------------------------------------------------------
# Errors


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is meant for the user, shown as is."""
    from flash.draft import DraftError
    from flash.targets.hub import TargetLoadError
    from flash.weights import WeightsError

    return (MediaError, DraftError, WeightsError, TargetLoadError, ValueError)


class UserError(Exception):
    """Input the user can fix; its message is shown as is."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _refused(message: str) -> str:
    """Log a user's error as one line (no traceback: nothing is wrong with the server) and return it."""
    _log.info("refused: %s", message)
    return message


# ---------------------------------------------------------------------------------------------
# Models


def _available(preset: Preset) -> bool:
    """Hub presets are 7B LMMs: offered only where a CUDA GPU is present."""
    return not preset.needs_gpu or torch.cuda.is_available()


def _preset(model: str | None) -> Preset:
    """The preset picked in the dropdown (its target id; a label is accepted too)."""
    for preset in PRESETS:
        if model in (preset.target, preset.label):
            return preset
    raise UserError(f"Unknown model {model!r}; choose one of: {', '.join(p.target for p in PRESETS)}.")


def _draft_path(preset: Preset) -> str | None:
    """The preset's trained draft when it is present here, else None (the shipped or an untrained draft)."""
    return preset.draft if preset.draft and Path(preset.draft).exists() else None


def _load_models(preset: Preset):
    """(target, draft) for ``preset`` from flash.models' cache (loaded there once per process)."""
    if not _available(preset):
        raise UserError(f"{preset.label} needs a CUDA GPU and this machine has none; pick the default model.")
    target = load_target(preset.target, quiet=True)
    return target, load_draft(target, _draft_path(preset), quiet=True)


def _draft_note(preset: Preset) -> str:
    if _draft_path(preset):
        return "trained draft"
    if preset.draft is None:
        return "the model's shipped draft where there is one, else an untrained one (the output is exact either way)"
    return "untrained draft: the output is still exact, but few drafts are accepted (train one for a speed-up)"


# ---------------------------------------------------------------------------------------------
# Warm-up and calibration


@dataclass(frozen=True)
class Calibration:
    """Warm races of the default model on one example at start-up: what this machine typically gives."""

    model: str
    speedups: tuple[float, ...]
    ar_step_s: float  # median own-clock seconds per autoregressive token after the prefill

    @property
    def typical(self) -> float:
        return statistics.median(self.speedups)

    def line(self) -> str:
        spread = (f": {min(self.speedups):.2f}–{max(self.speedups):.2f}×" if len(self.speedups) > 1 else "")
        races = _count(len(self.speedups), "warm race")
        return (f"typically {self.typical:.2f}× on this machine ({races} of {CALIBRATION_TOKENS} tokens on "
                f"{CALIBRATION_MEDIA.name} at start-up{spread})")


def ar_step_seconds(recording: RaceRecording) -> float | None:
    """Own-clock seconds per autoregressive token after the prefill (None with fewer than two steps)."""
    if not recording.baseline:
        return None
    view = recording.baseline[-1]
    if view.steps < 1:
        return None
    return (view.times[-1] - view.times[0]) / (view.token_counts[-1] - view.token_counts[0])


def disturbance(recording: RaceRecording, calibration: Calibration | None) -> str | None:
    """Why this race's figure may not be typical of this machine, or None: a load average above the
    core count, or autoregressive steps far from their calibrated time (same model)."""
    reasons = []
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        reasons.append(f"load average {load:.1f} on {cores} cores")
    step = ar_step_seconds(recording)
    if calibration is not None and step and recording.summary.get("model") == calibration.model:
        ratio = step / calibration.ar_step_s
        if not 1 / DISTURBED_STEP_RATIO <= ratio <= DISTURBED_STEP_RATIO:
            reasons.append(f"autoregressive steps took {ratio:.1f}× their calibrated time")
    return "; ".join(reasons) or None


class Warmup:
    """The server's start-up work, in a background thread; ``stage`` says what it is doing."""

    def __init__(self) -> None:
        self.started = False
        self.ready = threading.Event()
        self.stage = "not started"
        self.error: str | None = None
        self.calibration: Calibration | None = None

    def start(self, races: int) -> None:
        self.started = True
        threading.Thread(target=self._run, args=(races,), name="flash-warmup", daemon=True).start()

    def wait(self, timeout: float) -> bool:
        """True once the warm-up is over (or was never started)."""
        return not self.started or self.ready.wait(timeout)

    def _run(self, races: int) -> None:
        try:
            self.stage = ("loading the default model (on a first start: fetching and converting its weights, "
                          "building FLASH's CPU kernels)")
            target, draft = _load_models(_preset(DEFAULT_MODEL))
            media = load_media(CALIBRATION_MEDIA)
            self.stage = "warming up: one short race"
            _quiet_race(target, draft, media, 4)
            speedups, steps = [], []
            for i in range(races):
                self.stage = f"calibrating: warm race {i + 1} of {races}"
                recording = _quiet_race(target, draft, media, CALIBRATION_TOKENS)
                if recording.summary["speedup"] and ar_step_seconds(recording):
                    speedups.append(recording.summary["speedup"])
                    steps.append(ar_step_seconds(recording))
            if speedups:
                self.calibration = Calibration(target.name, tuple(speedups), statistics.median(steps))
                _log.info("calibration: %s", self.calibration.line())
            self.stage = "ready"
        except Exception as exc:  # noqa: BLE001 - the server still serves; the page says what failed
            _log.exception("warm-up failed")
            self.error = _one_line(exc)
        finally:
            self.ready.set()


def _quiet_race(target, draft, media: Media, tokens: int) -> RaceRecording:
    config = GenerationConfig(max_new_tokens=tokens, rules=target.logits_rules(), min_draft_prob=DEFAULT_MIN_DRAFT_PROB)
    recorder = RaceRecorder()
    for _ in recorder.watch(race(target, draft, media, "", config)):
        pass
    return recorder.recording


WARMUP = Warmup()


def _ready_line(preset: Preset, k: int) -> str:
    line = f"✓ Ready: {preset.label} · {_draft_note(preset)} · k = {k} draft tokens per step"
    calibration = WARMUP.calibration
    if calibration is not None and preset.target == DEFAULT_MODEL:
        line += f" · FLASH {calibration.line()}"
    return line


def prepare(model: str) -> Iterator[tuple[str, Any]]:
    """When the page opens or the model changes: show the warm-up's progress, load the model, fit k."""
    try:
        preset = _preset(model)
    except UserError as exc:
        yield f"✗ {_refused(str(exc))}", gr.skip()
        return
    if not _available(preset):
        yield f"✗ {_refused(f'{preset.label} needs a CUDA GPU and this machine has none')}", gr.skip()
        return
    while not WARMUP.wait(0.5):
        yield f"… Preparing the models: {WARMUP.stage}", gr.skip()
    if WARMUP.error:
        yield f"✗ The start-up warm-up failed: {WARMUP.error}", gr.skip()
        return
    yield f"… Loading {preset.label} (once per server; the first time may take a minute)", gr.skip()
    try:
        _, draft = _load_models(preset)
    except (UserError, *_user_errors()) as exc:
        yield f"✗ {_refused(_one_line(exc))}", gr.skip()
        return
    k = draft.cfg.k
    yield _ready_line(preset, k), gr.Slider(maximum=k, value=k)


# ---------------------------------------------------------------------------------------------
# Uploads


def _describe(media: Media) -> str:
    if media.kind == "image":
        return f"image, {media.size[0]}×{media.size[1]}"
    seconds = f"{media.duration_s:.1f} s, " if media.duration_s else ""
    return f"video, {seconds}{len(media.frames)} frames sampled"


def _image_preview(path: str, media: Media) -> str | None:
    """What an <img> shows for an image file: the file, or a PNG of it (TIFF); None for a video file."""
    try:
        with Image.open(path) as image:
            image_format = image.format
    except Exception:  # noqa: BLE001 - not an image file: a video
        image_format = None
    if image_format in BROWSER_IMAGES:
        return path  # animated GIF / PNG / WebP too: browsers animate them
    if image_format is None and media.kind == "video":
        return None
    out = _FILES / f"{uuid.uuid4().hex}.png"
    media.frames[0].save(out)
    return str(out)


def check_upload(path: str | None) -> Iterator[tuple[Any, Any, Any]]:
    """Check an uploaded (or example) file at once with the race's own loader and show it.

    Outputs: status, image preview, video preview. A file the race would refuse is refused now, with
    the same one-line message in the status and no preview (the file stays listed, so the message's
    subject is in view; racing it gives the same message); a video the browser cannot play gets an
    H.264 preview copy.
    """
    hidden_image, hidden_video = gr.Image(value=None, visible=False), gr.Video(value=None, visible=False)
    if not path:  # cleared by the user: a message shown stays until the next file
        yield gr.skip(), hidden_image, hidden_video
        return
    try:
        media = load_media(path)
    except MediaError as exc:
        yield f"✗ {_refused(_one_line(exc))}", hidden_image, hidden_video
        return
    ok = f"✓ {media.source}: {_describe(media)}"
    image = _image_preview(path, media)
    if image is not None:
        yield ok, gr.Image(value=image, visible=True), hidden_video
        return
    yield f"{ok} · making a preview the browser can play…", hidden_image, hidden_video
    try:
        playable = browser_preview(path, _preview_dir())
    except MediaError as exc:
        yield f"✗ {_refused(_one_line(exc))}", hidden_image, hidden_video
        return
    note = "" if str(playable) == str(path) else " · preview re-encoded as H.264 (the browser cannot play this codec)"
    yield ok + note, hidden_image, gr.Video(value=str(playable), visible=True)


def _preview_dir() -> Path:
    folder = _FILES / uuid.uuid4().hex
    folder.mkdir()
    return folder


# ---------------------------------------------------------------------------------------------
# Sessions: Stop ends the race of the session that pressed it


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


def _empty_figures(k: int = 4) -> tuple[go.Figure, go.Figure]:
    return acceptance_figure(SideView("flash"), k), speed_figure(SideView("ar"), SideView("flash"))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _side_line(view: SideView, title: str, flash: bool = False, stopped: bool = False) -> str:
    if not view.times:
        return f"**{title}** · {'■ stopped before its first token' if stopped else 'waiting…'}"
    parts = [f"**{title}**", _count(len(view.tokens), "token"), f"{view.seconds:.2f} s",
             f"{view.tokens_per_s:.1f} tokens/s"]
    if flash and view.steps:  # the baseline's steps are its tokens
        parts[2:2] = [_count(view.steps, "step"), f"τ {(len(view.tokens) - 1) / view.steps:.2f}"]
    return " · ".join(parts) + (" ✓" if view.done else " ■ stopped" if stopped else "")


def _verdict(summary: dict[str, Any]) -> str:
    if summary["identical"] is True:
        return "✓ identical output (temperature 0: FLASH must reproduce the baseline token for token)"
    if summary["identical"] is False:
        return f"✗ {difference_words(summary)}"
    if summary["temperature"] > 0:
        return (f"sampling at temperature {summary['temperature']:g}: the outputs differ by design; "
                "FLASH keeps the target's distribution")
    return "exactness unknown: the race was stopped before the end"


def _stopped_words(summary: dict[str, Any]) -> str:
    flash, base = summary["flash"]["new_tokens"], summary["baseline"]["new_tokens"]
    if flash == base == 0:
        return "Stopped before the first token"
    return f"Stopped after {_count(flash, 'token')} of FLASH and {base} of autoregressive"


def _final_status(summary: dict[str, Any]) -> str:
    if summary["cancelled"]:
        return f"■ {_stopped_words(summary)}"
    speedup = "" if summary["speedup"] is None else f": FLASH {summary['speedup']:.2f}× the baseline's speed"
    check = {True: ", identical output ✓", False: f", {difference_words(summary)} ✗"}
    return f"Finished{speedup}{check.get(summary['identical'], '')}"


def _honesty(summary: dict[str, Any]) -> list[str]:
    """What this machine typically gives beside this race's figure, and whether the race was disturbed."""
    lines = []
    if summary.get("typical"):
        lines.append(f"FLASH {summary['typical']}")
    if summary.get("disturbed"):
        lines.append(f"⚠ Disturbed: the machine was busy during this race ({summary['disturbed']}); "
                     "its figure is not what this machine typically gives.")
    return lines


def summary_markdown(summary: dict[str, Any], note: str) -> str:
    base, flash = summary["baseline"], summary["flash"]
    speedup = summary["speedup"]
    if summary["cancelled"]:
        head = f"### ■ {_stopped_words(summary)}"
        if speedup is not None:
            head += f"\nSo far FLASH ran at {speedup:.2f}× the baseline's speed (partial figures below)."
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
    honesty = "\n\n".join(_honesty(summary)) if not summary["cancelled"] else ""
    return "\n".join([head, "", honesty, "", *rows, "", stats, "", _verdict(summary), "", f"<small>{note}</small>"])


def headline_markdown(summary: dict[str, Any] | None) -> str:
    """Presentation mode's headline: this race's ratio, and beside it what this machine typically gives."""
    if summary is None:
        return "## ⏱ Racing…"
    if summary["cancelled"]:
        return f"## ■ {_stopped_words(summary)}"
    speedup = summary["speedup"]
    if speedup is None:
        return "## Finished"
    check = " · identical output ✓" if summary["identical"] else ""
    return "\n\n".join([f"## ⚡ FLASH {speedup:.2f}× {'faster' if speedup >= 1 else '(slower)'}{check}",
                        *_honesty(summary)])


def _frame_outputs(frame: RaceFrame, k: int, figures: bool) -> dict[str, Any]:
    stopped = frame.summary is not None and frame.summary["cancelled"]
    out = {
        "ar_stats": _side_line(frame.baseline, "Autoregressive", stopped=stopped),
        "ar_text": frame.baseline.text,
        "flash_stats": _side_line(frame.flash, "FLASH", flash=True, stopped=stopped),
        "flash_text": list(frame.flash.segments),
    }
    if figures:
        out["accept_plot"] = acceptance_figure(frame.flash, k)
        out["speed_plot"] = speed_figure(frame.baseline, frame.flash)
    return out


# ---------------------------------------------------------------------------------------------
# The race handlers

RACING = "⏱ Racing: both panels show each side after the same amount of its own time"
OUTPUTS = ("status", "ar_stats", "ar_text", "flash_stats", "flash_text", "accept_plot", "speed_plot",
           "summary_md", "summary_json")
API_OUTPUTS = (*OUTPUTS, "last_race")  # a State: kept for /replay, not among the values a client receives
UI_OUTPUTS = (*API_OUTPUTS, "headline", "replay_button", "replay_files")


def _pack(values: dict[str, Any], names: tuple[str, ...] = OUTPUTS) -> tuple[Any, ...]:
    """Output tuple in ``names`` order; components not named keep their value."""
    return tuple(values.get(name, gr.skip()) for name in names)


def run_race(media_path: str | None, prompt: str, model: str, max_new_tokens: float, temperature: float,
             top_p: float, k: float, seed: float, request: gr.Request = None) -> Iterator[tuple[Any, ...]]:
    """The API's race: streams both texts, the charts and a summary; bad input raises a one-line error."""
    for values in _guarded_race(media_path, prompt, model, max_new_tokens, temperature, top_p, k, seed, request):
        if "error" in values:
            yield _pack({"status": f"✗ {values['error']}"}, API_OUTPUTS)
            raise gr.Error(values["error"], print_exception=False)
        yield _pack(values, API_OUTPUTS)


def race_from_page(media_path: str | None, prompt: str, model: str, max_new_tokens: float, temperature: float,
                   top_p: float, k: float, seed: float, present: bool,
                   request: gr.Request = None) -> Iterator[tuple[Any, ...]]:
    """The page's race: as :func:`run_race`, but errors go to the status line (one place, no error badge
    on every output), and at the end the race is kept for its replay. In presentation mode a race with
    no file runs on the first example."""
    if not media_path and present:
        media_path = str(_examples()[0][0][0])
    for values in _guarded_race(media_path, prompt, model, max_new_tokens, temperature, top_p, k, seed, request):
        if "error" in values:
            values = {"status": f"✗ {values['error']}"}
        yield _pack(values, UI_OUTPUTS)


def _guarded_race(media_path, prompt, model, max_new_tokens, temperature, top_p, k, seed,
                  request: gr.Request | None) -> Iterator[dict[str, Any]]:
    """The race's output values; a failure ends it with ``{"error": one line}`` (logged as one line for a
    user's error, with its traceback for anything else)."""
    key = _session(request)
    cancel = _CANCELS.start(key)
    try:
        yield from _race_stream(media_path, prompt or "", model, max_new_tokens, temperature, top_p, k, seed,
                                cancel)
    except (UserError, *_user_errors()) as exc:
        yield {"error": _refused(_one_line(exc))}
    except Exception as exc:  # noqa: BLE001 - the server stays up; the user gets one line, the log the rest
        _log.exception("race failed")
        yield {"error": f"The model failed ({type(exc).__name__}: {_one_line(exc)[:200]})."}
    finally:
        _CANCELS.finish(key, cancel)


def _race_stream(media_path, prompt, model, max_new_tokens, temperature, top_p, k, seed,
                 cancel: threading.Event) -> Iterator[dict[str, Any]]:
    preset = _preset(model)
    if not media_path:
        raise UserError("Upload an image or a video first (or click one of the examples).")
    media = load_media(media_path)
    empty_accept, empty_speed = _empty_figures()
    yield {"status": f"… Loading {preset.label}", "ar_stats": "", "ar_text": "", "flash_stats": "",
           "flash_text": [], "accept_plot": empty_accept, "speed_plot": empty_speed, "summary_md": "",
           "summary_json": None, "headline": "## ⏱ Getting ready…", "replay_button": gr.Button(interactive=False),
           "replay_files": gr.File(value=None, visible=False)}
    # A race never pays for the start-up work (downloads, conversion, kernels): it waits for it.
    while not WARMUP.wait(0.5) and not cancel.is_set():
        yield {"status": f"… Waiting for the start-up warm-up: {WARMUP.stage}"}
    target, draft = _load_models(preset)
    config = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                              top_p=float(top_p), seed=int(seed), k=int(k) if k else None,
                              rules=target.logits_rules(), min_draft_prob=DEFAULT_MIN_DRAFT_PROB)
    k_used = min(config.k or draft.cfg.k, draft.cfg.k)
    yield {"status": "… Encoding the media and starting both sides"}
    recorder = RaceRecorder()
    last_text = last_figure = 0.0
    started = False
    for frame in on_one_clock(recorder.watch(race(target, draft, media, prompt, config, cancel=cancel))):
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
            out["headline"] = headline_markdown(None)
        last_text, last_figure = now, (now if figures else last_figure)
        if final:
            out.update(_race_end(recorder.recording, media, prompt, target, preset))
        yield out


def _race_end(recording: RaceRecording, media: Media, prompt: str, target, preset: Preset) -> dict[str, Any]:
    """The outputs of a race's end: status, summary (with the honest context), the replay kept."""
    summary = dict(recording.summary)
    calibration = WARMUP.calibration if preset.target == DEFAULT_MODEL else None
    summary["typical"] = calibration.line() if calibration is not None else None
    summary["typical_speedup"] = calibration.typical if calibration is not None else None
    summary["disturbed"] = disturbance(recording, calibration)
    replay = RaceReplay.of(recording, media, prompt, machine_line(target), summary["typical"] or "")
    has_tokens = bool(recording.flash or recording.baseline)
    return {"status": _final_status(summary), "summary_md": summary_markdown(summary, _draft_note(preset)),
            "summary_json": summary, "headline": headline_markdown(summary), "last_race": replay,
            "replay_button": gr.Button(interactive=has_tokens)}


def stop(request: gr.Request = None) -> Any:
    """The API's Stop: stop this session's race between two steps; with no race running, change nothing."""
    if _CANCELS.cancel(_session(request)):
        return "■ Stopped."
    return gr.skip()


def stop_from_page(request: gr.Request = None) -> None:
    """The page's Stop: the race's last update then says after how many tokens it stopped. (It writes
    nothing itself: its reply could reach the page after that update and hide it.)"""
    _CANCELS.cancel(_session(request))


def make_replay(replay: RaceReplay | None) -> Iterator[tuple[Any, Any]]:
    """The last race as an MP4 and a GIF replaying it in real time, and a PNG result card (downloads)."""
    if replay is None:
        yield "✗ Race first: the replay is made from the last race on this page.", gr.skip()
        return
    folder = Path(tempfile.mkdtemp(dir=_FILES))
    stem = f"flash-race-{Path(replay.media_name).stem or 'media'}"
    paths = []
    for step, (suffix, write, what) in enumerate(((".png", write_card, "result card"),
                                                  (".mp4", write_video, "MP4 video"),
                                                  (".gif", write_gif, "GIF")), start=1):
        yield f"… Rendering the replay: {what} ({step} of 3)", gr.skip()
        paths.append(str(write(replay, folder / f"{stem}{suffix}")))
    yield ("✓ Replay ready: MP4 and GIF in real time, and a result card (download below)",
           gr.File(value=paths, visible=True))


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


def _model_choices() -> tuple[list[tuple[str, str]], str | None]:
    """The presets this machine can run, and a note naming those it cannot (GPU ones without a GPU)."""
    offered = [(p.label, p.target) for p in PRESETS if _available(p)]
    missing = [p.label.split(" (")[0] for p in PRESETS if not _available(p)]
    note = f"{' and '.join(missing)} appear on a machine with a CUDA GPU" if missing else None
    return offered, note


def build_demo() -> gr.Blocks:
    """The app: inputs on the left, the race (texts, live charts, summary) on the right."""
    examples, labels = _examples()
    choices, gpu_note = _model_choices()
    with gr.Blocks(title="FLASH race") as demo:
        gr.Markdown(INTRO, elem_classes=["flash-full"])
        headline = gr.Markdown("## ⚡ FLASH vs autoregressive: press Space or ▶ Race", elem_id="headline",
                               elem_classes=["flash-present-only"])
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                with gr.Column(elem_classes=["flash-full"]):
                    media = gr.File(label="Image or video", type="filepath", elem_id="media")
                    image_preview = gr.Image(label="Preview", interactive=False, visible=False, height=200,
                                             elem_id="image-preview")
                    video_preview = gr.Video(label="Preview", interactive=False, visible=False, height=200,
                                             elem_id="video-preview")
                    gr.Examples(examples, inputs=[media], example_labels=labels, label="Examples",
                                examples_per_page=10)
                    prompt = gr.Textbox(label="Prompt", placeholder="Empty: describe the image (or the video)",
                                        lines=2)
                    # A custom value reaches the handlers, which name what is wrong with it (a GPU model
                    # asked for through the API on a machine without a GPU, say), rather than gradio's
                    # "not in the list of choices".
                    model = gr.Dropdown(choices, value=DEFAULT_MODEL, label="Model", info=gpu_note, elem_id="model",
                                        allow_custom_value=True)
                with gr.Row():
                    race_button = gr.Button("▶ Race", variant="primary", elem_id="race")
                    stop_button = gr.Button("■ Stop", variant="stop", elem_id="stop")
                status = gr.Markdown("", elem_id="status")
                with gr.Column(elem_classes=["flash-full"]):
                    replay_button = gr.Button("Replay for slides: MP4, GIF, result card", elem_id="replay",
                                              interactive=False)
                    replay_files = gr.File(label="Replay", file_count="multiple", visible=False,
                                           interactive=False, elem_id="replay-files")
                present = gr.Checkbox(False, label="Presentation mode (also: ?present=1 in the URL)", elem_id="present")
                with gr.Accordion("Settings", open=False, elem_classes=["flash-full"]):
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
                with gr.Row(elem_classes=["flash-full"]):
                    accept_plot = gr.Plot(label="Tokens per FLASH step", elem_id="accept-plot")
                    speed_plot = gr.Plot(label="Tokens per second", elem_id="speed-plot")
                summary_md = gr.Markdown("", elem_id="summary", elem_classes=["flash-full"])
                with gr.Accordion("Summary (JSON)", open=False, elem_classes=["flash-full"]):
                    summary_json = gr.JSON(label="Summary", elem_id="summary-json")
        last_race = gr.State(None)
        # The API's race and Stop (errors raised, not shown in the page; Stop answers the caller).
        api_race, api_stop = gr.Button(visible=False), gr.Button(visible=False)

        components = {"status": status, "ar_stats": ar_stats, "ar_text": ar_text, "flash_stats": flash_stats,
                      "flash_text": flash_text, "accept_plot": accept_plot, "speed_plot": speed_plot,
                      "summary_md": summary_md, "summary_json": summary_json, "headline": headline,
                      "last_race": last_race, "replay_button": replay_button, "replay_files": replay_files}
        race_inputs = [media, prompt, model, max_new_tokens, temperature, top_p, k, seed]
        media.change(check_upload, inputs=media, outputs=[status, image_preview, video_preview],
                     api_visibility="private", concurrency_limit=None, show_progress="hidden")
        demo.load(prepare, inputs=model, outputs=[status, k], api_visibility="private", show_progress="hidden",
                  concurrency_limit=None)
        # The plots drawn once, empty, when the page opens: plotly's first draw freezes the page for a
        # moment, better now than in the middle of the first race.
        demo.load(lambda: _empty_figures(), outputs=[accept_plot, speed_plot], api_visibility="private",
                  show_progress="hidden")
        demo.load(None, js=PRESENT_FROM_URL_JS, outputs=present, api_visibility="private")
        present.change(None, inputs=present, js=PRESENT_TOGGLE_JS, api_visibility="private")
        model.change(prepare, inputs=model, outputs=[status, k], api_visibility="private", show_progress="hidden",
                     concurrency_limit=None)
        race_button.click(_on_gpu(race_from_page), inputs=[*race_inputs, present],
                          outputs=[components[name] for name in UI_OUTPUTS], api_visibility="private",
                          show_progress="minimal", concurrency_id="race")
        api_race.click(_on_gpu(run_race), inputs=race_inputs, outputs=[components[name] for name in API_OUTPUTS],
                       api_name="race", concurrency_id="race")
        stop_button.click(stop_from_page, api_visibility="private", concurrency_limit=None, show_progress="hidden")
        api_stop.click(stop, outputs=status, api_name="stop", concurrency_limit=None, show_progress="hidden")
        # Rendering shares the race's queue: a replay being drawn must not slow a race being timed.
        replay_button.click(make_replay, inputs=last_race, outputs=[status, replay_files], api_name="replay",
                            concurrency_id="race", show_progress="minimal")
    return demo.queue(default_concurrency_limit=1)


def main() -> None:
    from transformers.utils import logging as hf_logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flash").setLevel(logging.INFO)
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars would bury the log's lines
    hf_logging.set_verbosity_error()
    WARMUP.start(races=int(os.environ.get("FLASH_CALIBRATION_RACES", "3")))
    build_demo().launch(css=CSS, head=HEAD_JS, allowed_paths=[str(_FILES)])


if __name__ == "__main__":
    main()
