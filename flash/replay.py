"""A finished race, replayed for slides: an MP4 (H.264) and a GIF in real time, and a PNG result card.

Pure rendering from a :class:`flash.race.RaceRecording` (each side's view after each of its steps,
on its own clock): nothing is decoded again and no model is needed. Frame ``i`` shows the race at
own-clock time ``i / fps``, as the app's one-clock display showed it (:func:`flash.race.on_one_clock`),
so the video lasts as long as the slower side took. Everything is drawn with Pillow (the charts
too: plotly's static export needs kaleido, which the project does not ship) at 1280x720.

Fonts: DejaVu Sans where the system has it (Debian's ``fonts-dejavu-core``), else Pillow's own
scalable font, which lacks τ, × and other non-Latin-1 symbols; those are then spelled in ASCII.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import av
from PIL import Image, ImageDraw, ImageFont

from flash.race import RaceRecording, SideView

__all__ = ["GIF_FPS", "HEIGHT", "VIDEO_FPS", "WIDTH", "RaceReplay", "frame_times", "machine_line",
           "render_card", "render_frame", "write_card", "write_gif", "write_video"]

WIDTH, HEIGHT = 1280, 720
VIDEO_FPS = 15
GIF_FPS = 10  # GIF delays are whole centiseconds: 10 fps is exact, and half the frames of the MP4
GIF_HOLD_S = 3.0  # a GIF loops: hold the result before it starts over
THUMBNAIL_PX = 480  # the longest side kept of the media's first frame

# The app's colours (EAGLE's convention: accepted = orange, the target's own tokens = blue).
ORANGE, BLUE, GREY = "#f97316", "#60a5fa", "#6b7280"
ACCEPTED_TINT, TARGET_TINT = "#fed7aa", "#dbeafe"  # text backgrounds: light, so black text stays readable
INK, MUTED, RULE, PAPER, BAR = "#111827", "#4b5563", "#d1d5db", "#ffffff", "#111827"
MARGIN = 32
TEXT_TOP = 116  # the captions' boxes
CARD_TEXT_TOP = 374  # the card's captions' boxes (under the thumbnail)
TEXT_SIZES = (26, 24, 22, 20, 18, 16, 14)  # the largest size the final captions fit in is used throughout
PANEL_TITLES = ("Autoregressive", "FLASH")
_ASCII = {"τ": "tau", "×": "x", "⚡ ": "", "✓": "(ok)", "✗": "(x)", "■ ": "", "…": "...", "·": "-", "—": "-"}


# ---------------------------------------------------------------------------------------------
# What a replay shows


@dataclass(frozen=True)
class RaceReplay:
    """A recorded race and what the pictures say about it besides the race itself."""

    recording: RaceRecording
    media_name: str = ""
    thumbnail: Image.Image | None = None  # RGB, at most THUMBNAIL_PX on its longest side
    prompt: str = ""
    machine: str = ""  # what it ran on, one line (see :func:`machine_line`)
    typical: str = ""  # what this machine typically gives, one line, if known (the app's calibration)

    def __post_init__(self) -> None:
        if self.thumbnail is not None and self.thumbnail.mode != "RGB":
            raise ValueError("RaceReplay.thumbnail must be an RGB image")

    @staticmethod
    def of(recording: RaceRecording, media: Any = None, prompt: str = "", machine: str = "",
           typical: str = "") -> RaceReplay:
        """A replay of ``recording``; ``media`` (a :class:`flash.media.Media`) gives the name and thumbnail."""
        thumbnail = None
        if media is not None:
            thumbnail = media.frames[0].copy()
            thumbnail.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        return RaceReplay(recording, getattr(media, "source", ""), thumbnail, prompt, machine, typical)


def machine_line(target: Any) -> str:
    """The machine a race ran on, for a caption: the GPU's name, or the CPU's and its core count."""
    from flash.bench import machine_info

    info = machine_info(target)
    if info["gpu"] and str(info["device"]).startswith("cuda"):
        return f"{info['gpu']} · torch {info['torch']}"
    return f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads) · torch {info['torch']}"


def frame_times(duration_s: float, fps: float, hold_s: float = 0.0) -> list[float]:
    """Own-clock time of each frame: every ``1 / fps`` from 0, the last at the end, then ``hold_s`` of the end.

    ``len(times) / fps`` is the race's duration to within one frame, plus the hold.
    """
    if fps <= 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive number, not {fps!r}")
    if hold_s < 0:
        raise ValueError(f"hold_s must be >= 0, not {hold_s!r}")
    # As many frames as the race lasts (to a frame), the last one showing its end.
    times = [i / fps for i in range(max(math.ceil(max(duration_s, 0.0) * fps - 1e-9), 1))]
    times[-1] = max(duration_s, 0.0)
    return times + [times[-1]] * round(hold_s * fps)


# ---------------------------------------------------------------------------------------------
# Files


def write_video(replay: RaceReplay, path: str | Path, fps: int = VIDEO_FPS, hold_s: float = 0.0) -> Path:
    """An H.264 MP4 (yuv420p, playable in browsers and slide software) of the race in real time."""
    path = Path(path)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = _h264_stream(container, fps)
        for image in _frames(replay, fps, hold_s):
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return path


def _h264_stream(container: Any, fps: int) -> Any:
    for codec in ("libx264", "h264"):  # FFmpeg's name for x264, then whatever H.264 encoder it has
        try:
            stream = container.add_stream(codec, rate=fps)
        except (av.error.FFmpegError, ValueError):
            continue
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if codec == "libx264":  # sharp text: a low CRF, tuned for flat drawn content
            stream.options = {"crf": "20", "preset": "fast", "tune": "animation"}
        return stream
    raise RuntimeError("this PyAV build has no H.264 encoder")


def write_gif(replay: RaceReplay, path: str | Path, fps: int = GIF_FPS, hold_s: float = GIF_HOLD_S) -> Path:
    """A looping GIF of the race in real time, holding the result ``hold_s`` before it starts over."""
    if 100 % fps:
        raise ValueError(f"GIF frame delays are whole centiseconds: fps must divide 100, not {fps}")
    path = Path(path)
    images = list(_frames(replay, fps, hold_s))
    # One palette for all frames (the final frame's, which holds every colour used): frames that
    # differ only where the race moved are then stored as small deltas, and colours do not flicker.
    palette = images[-1].quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    frames = [image.quantize(palette=palette, dither=Image.Dither.NONE) for image in images]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0,
                   optimize=False)
    return path


def write_card(replay: RaceReplay, path: str | Path) -> Path:
    """The PNG result card (:func:`render_card`)."""
    path = Path(path)
    render_card(replay).save(path, format="PNG", optimize=True)
    return path


def _frames(replay: RaceReplay, fps: int, hold_s: float) -> Iterator[Image.Image]:
    painter = _Painter(replay)
    last_key, last_image = None, None
    for seconds in frame_times(replay.recording.duration_s, fps, hold_s):
        key = round(seconds, 6)
        if key != last_key:  # the hold repeats the last frame: draw it once
            last_key, last_image = key, painter.frame(seconds)
        yield last_image


def render_frame(replay: RaceReplay, seconds: float) -> Image.Image:
    """The replay's frame at own-clock time ``seconds`` (the end: ``replay.recording.duration_s``)."""
    return _Painter(replay).frame(seconds)


def render_card(replay: RaceReplay) -> Image.Image:
    """1280x720: the media's thumbnail, the speed-up and τ, both final captions, the machine."""
    return _Painter(replay).card()


# ---------------------------------------------------------------------------------------------
# Fonts and text


@lru_cache(maxsize=1)
def _dejavu() -> bool:
    try:
        ImageFont.truetype("DejaVuSans.ttf", 12)
        return True
    except OSError:
        return False


@lru_cache(maxsize=64)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if _dejavu():
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    return ImageFont.load_default(size=size)


def _say(text: str) -> str:
    """``text`` as the font can draw it: symbols spelled in ASCII without DejaVu."""
    if _dejavu():
        return text
    for symbol, ascii_text in _ASCII.items():
        text = text.replace(symbol, ascii_text)
    return text


@dataclass(frozen=True)
class _Run:
    x: float
    text: str
    origin: str | None  # "accepted", "target", or None (plain text)


def _wrap(segments: Sequence[tuple[str, str | None]], font: Any, width: float) -> list[list[_Run]]:
    """Lay out tagged text pieces in lines at most ``width`` wide, breaking between words.

    A word longer than a line is broken between characters. Pieces keep their origin, so a word
    made of an accepted piece and a target piece shows both colours.
    """
    text = "".join(piece for piece, _ in segments)
    origins = [origin for piece, origin in segments for _ in piece]
    lines: list[list[_Run]] = [[]]
    x = 0.0
    for match in re.finditer(r"\n|[^\S\n]*\S+[^\S\n]*|[^\S\n]+", text):
        word, start = match.group(), match.start()
        if word == "\n":
            lines.append([])
            x = 0.0
            continue
        if x > 0 and x + font.getlength(word.rstrip()) > width:
            lines.append([])
            x = 0.0
            word, start = word.lstrip(), start + len(word) - len(word.lstrip())
        for piece, piece_start in _pieces_by_origin(word, start, origins):
            for chunk in _fit_chunks(piece, font, width, x):
                if x > 0 and x + font.getlength(chunk) > width and chunk.strip():
                    lines.append([])
                    x = 0.0
                lines[-1].append(_Run(x, chunk, origins[piece_start] if origins else None))
                x += font.getlength(chunk)
    return lines


def _pieces_by_origin(word: str, start: int, origins: list[str | None]) -> Iterator[tuple[str, int]]:
    """``word`` cut where the origin of its characters changes, with each piece's index in the text."""
    i = 0
    while i < len(word):
        j = i + 1
        while j < len(word) and origins[start + j] == origins[start + i]:
            j += 1
        yield word[i:j], start + i
        i = j


def _fit_chunks(piece: str, font: Any, width: float, x: float) -> list[str]:
    """``piece`` whole, or cut between characters where it alone is wider than a line."""
    if font.getlength(piece.rstrip()) <= width:
        return [piece]
    chunks, current = [], ""
    for ch in piece:
        if current and font.getlength(current + ch) > width - (x if not chunks else 0):
            chunks.append(current)
            current = ""
        current += ch
    return [*chunks, current] if current else chunks


# ---------------------------------------------------------------------------------------------
# Charts


@dataclass(frozen=True)
class _Axes:
    """A chart's plot area in pixels and its data ranges."""

    left: float
    top: float
    right: float
    bottom: float
    x_max: float
    y_max: float
    x_min: float = 0.0

    def x(self, value: float) -> float:
        span = self.x_max - self.x_min
        return self.left + (value - self.x_min) / span * (self.right - self.left) if span > 0 else self.left

    def y(self, value: float) -> float:
        return self.bottom - value / self.y_max * (self.bottom - self.top) if self.y_max > 0 else self.bottom


def _nice_step(span: float, ticks: int = 5) -> float:
    """A 1, 2 or 5 times a power of ten step giving about ``ticks`` ticks over ``span``."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _tick_label(value: float, step: float) -> str:
    return f"{value:.0f}" if step >= 1 else f"{value:.{max(0, -math.floor(math.log10(step)))}f}"


def _draw_chart_frame(image: Image.Image, box: tuple[int, int, int, int], title: str, x_title: str, y_title: str,
                       x_range: tuple[float, float], y_max: float, integer_x: bool = False) -> _Axes:
    """Title, grid, ticks and axis titles in ``box``; the plot area's :class:`_Axes`."""
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    draw.text((x0, y0), _say(title), font=_font(17, bold=True), fill=INK)
    axes = _Axes(x0 + 52, y0 + 30, x1 - 10, y1 - 40, x_range[1], y_max, x_range[0])
    small = _font(13)
    y_step = _nice_step(y_max)
    value = 0.0
    while value <= y_max + 1e-9:
        y = axes.y(value)
        draw.line((axes.left, y, axes.right, y), fill="#eef0f3" if value else RULE, width=1)
        label = _tick_label(value, y_step)
        draw.text((axes.left - 6 - small.getlength(label), y - 8), label, font=small, fill=MUTED)
        value += y_step
    x_step = _nice_step(x_range[1] - x_range[0])
    if integer_x:
        x_step = max(1.0, round(x_step))
    value = math.ceil(x_range[0] / x_step) * x_step
    while value <= x_range[1] + 1e-9:
        x = axes.x(value)
        draw.line((x, axes.bottom, x, axes.bottom + 4), fill=MUTED, width=1)
        label = _tick_label(value, x_step)
        draw.text((x - small.getlength(label) / 2, axes.bottom + 6), label, font=small, fill=MUTED)
        value += x_step
    draw.line((axes.left, axes.top, axes.left, axes.bottom), fill=RULE, width=1)
    draw.text(((axes.left + axes.right) / 2 - small.getlength(_say(x_title)) / 2, axes.bottom + 22), _say(x_title),
              font=small, fill=MUTED)
    _vertical_text(image, (x0, (axes.top + axes.bottom) / 2), _say(y_title), small)
    return axes


def _vertical_text(image: Image.Image, centre_left: tuple[float, float], text: str, font: Any) -> None:
    width = int(font.getlength(text)) + 2
    label = Image.new("L", (width, 18), 0)
    ImageDraw.Draw(label).text((1, 0), text, font=font, fill=255)
    label = label.rotate(90, expand=True)
    x, y = int(centre_left[0]), int(centre_left[1] - label.height / 2)
    image.paste(Image.new("RGB", label.size, MUTED), (x, y), label)


def _dashed_line(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour: str, dash: int = 8) -> None:
    x = x0
    while x < x1:
        draw.line((x, y, min(x + dash, x1), y), fill=colour, width=2)
        x += 2 * dash


def _legend(draw: ImageDraw.ImageDraw, right: float, y: float, items: Sequence[tuple[str, str]]) -> None:
    """Coloured squares and labels, right-aligned at ``right``."""
    font = _font(13)
    widths = [font.getlength(_say(label)) + 24 for label, _ in items]
    x = right - sum(widths)
    for (label, colour), width in zip(items, widths, strict=True):
        draw.rectangle((x, y + 3, x + 11, y + 14), fill=colour)
        draw.text((x + 15, y), _say(label), font=font, fill=MUTED)
        x += width


# ---------------------------------------------------------------------------------------------
# The painter: what is fixed over a replay is worked out once


class _Painter:
    def __init__(self, replay: RaceReplay) -> None:
        self.replay = replay
        rec = replay.recording
        self.summary = rec.summary
        self.duration = rec.duration_s
        self.final_baseline, self.final_flash = rec.at(self.duration)
        self.k = int(self.summary.get("k") or 1)
        # Fixed axes: the charts grow into their final extent rather than rescaling as the race runs.
        self.flash_steps = max(self.final_flash.steps, 1)
        # Each view's series is a prefix of its side's final one.
        self.rate_max = max((*self.final_baseline.rates, *self.final_flash.rates, 1e-3))
        self.panel_w = (WIDTH - 3 * MARGIN) // 2
        self.text_box_h = 272
        self.text_size = self._fitting_size(self.panel_w - 24, self.text_box_h - 16,
                                            self.final_baseline.text, self.final_flash.segments)
        self.card_text_size = self._fitting_size(self.panel_w - 24, HEIGHT - MARGIN - CARD_TEXT_TOP - 16,
                                                 self.final_baseline.text, self.final_flash.segments)
        self.title_w = [_font(20, bold=True).getlength(title) for title in PANEL_TITLES]
        self.background = self._background()
        self._state_key: tuple[int, int, bool] | None = None
        self._state = self.background

    @staticmethod
    def _fitting_size(width: float, height: float, baseline_text: str,
                      flash_segments: Sequence[tuple[str, str]]) -> int:
        for size in TEXT_SIZES:
            font = _font(size)
            line_h = _line_height(size)
            lines = max(len(_wrap([(baseline_text, None)], font, width)), len(_wrap(flash_segments, font, width)))
            if lines * line_h <= height:
                return size
        return TEXT_SIZES[-1]

    # --- the race frame ---------------------------------------------------------------------

    def _background(self) -> Image.Image:
        """The frame's fixed parts: header, panel titles, legends and the charts' axes."""
        image = Image.new("RGB", (WIDTH, HEIGHT), PAPER)
        draw = ImageDraw.Draw(image)
        self._header(image, draw, "FLASH vs autoregressive decoding")
        for column, title in enumerate(PANEL_TITLES):
            draw.text((self._column_x(column), 86), title, font=_font(20, bold=True), fill=INK)
        _legend(draw, WIDTH - MARGIN, TEXT_TOP + self.text_box_h + 3, (("accepted draft tokens", ACCEPTED_TINT),
                                                                       ("target's own tokens", TARGET_TINT)))
        chart_top = TEXT_TOP + self.text_box_h + 26
        box = (MARGIN, chart_top, MARGIN + self.panel_w, chart_top + 200)
        self.accept_axes = _draw_chart_frame(image, box, "Tokens per FLASH step", "FLASH step (one target pass each)",
                                             "tokens", (0.5, self.flash_steps + 0.5), self.k + 1.6, integer_x=True)
        _dashed_line(draw, self.accept_axes.left, self.accept_axes.right, self.accept_axes.y(self.k + 1), GREY)
        draw.text((self.accept_axes.left + 6, self.accept_axes.y(self.k + 1) - 17), f"k+1 = {self.k + 1}",
                  font=_font(13), fill=MUTED)
        _legend(draw, box[2], box[1] + 2, (("accepted", ORANGE), ("target's own", BLUE)))
        box = (2 * MARGIN + self.panel_w, chart_top, WIDTH - MARGIN, chart_top + 200)
        self.speed_axes = _draw_chart_frame(image, box, "Tokens per second", "own-clock seconds", "tokens / s",
                                            (0.0, max(self.duration, 1e-3)), self.rate_max * 1.15)
        _legend(draw, box[2], box[1] + 2, (("autoregressive", GREY), ("FLASH", ORANGE)))
        return image

    def _column_x(self, column: int) -> int:
        return MARGIN + column * (self.panel_w + MARGIN)

    def _header(self, image: Image.Image, draw: ImageDraw.ImageDraw, title: str, thumbnail: bool = True) -> None:
        draw.rectangle((0, 0, WIDTH, 70), fill=BAR)
        x = MARGIN
        if thumbnail and self.replay.thumbnail is not None:
            thumb = self.replay.thumbnail.copy()
            thumb.thumbnail((96, 58))
            image.paste(thumb, (x, 6 + (58 - thumb.height) // 2))
            x += thumb.width + 16
        draw.text((x, 8), _say(title), font=_font(26, bold=True), fill="#ffffff")
        draw.text((x, 42), _say(self._subtitle()), font=_font(15), fill="#d1d5db")

    def _subtitle(self) -> str:
        parts = [str(self.summary.get("model", "")), self.replay.media_name, self.replay.prompt.strip()]
        method = self.summary.get("method")
        if method:
            parts.insert(1, f"{method}, k = {self.k}")
        line = " · ".join(part for part in parts if part)
        return line if len(line) <= 110 else line[:107] + "…"

    def frame(self, seconds: float) -> Image.Image:
        """The frame at own-clock ``seconds``: the race's state then, and the clock."""
        seconds = min(max(seconds, 0.0), self.duration)
        baseline, flash = self.replay.recording.at(seconds)
        # Frames come in time order and most show the same state as the one before (a step takes
        # several frames): the state is drawn once and only the clock per frame.
        key = (len(baseline.times), len(flash.times), seconds >= self.duration)
        if key != self._state_key:
            self._state_key, self._state = key, self._draw_state(seconds, baseline, flash)
        image = self._state.copy()
        clock, font = f"{seconds:5.1f} s", _font(26, bold=True)
        ImageDraw.Draw(image).text((WIDTH - MARGIN - font.getlength(clock), 18), clock, font=font, fill="#ffffff")
        return image

    def _draw_state(self, seconds: float, baseline: SideView, flash: SideView) -> Image.Image:
        image = self.background.copy()
        draw = ImageDraw.Draw(image)
        for column, (view, segments) in enumerate(((baseline, [(baseline.text, None)]),
                                                   (flash, list(flash.segments)))):
            x = self._column_x(column)
            draw.text((x + self.title_w[column] + 14, 90), _say(_side_stats(view, column == 1)),
                      font=_font(15), fill=MUTED)
            box = (x, TEXT_TOP, x + self.panel_w, TEXT_TOP + self.text_box_h)
            draw.rounded_rectangle(box, radius=8, outline=ORANGE if view.done and column else RULE, width=2)
            self._text(draw, box, segments, self.text_size)
        self._acceptance_bars(draw, flash)
        self._speed_lines(draw, baseline, flash)
        self._footer(draw, seconds, baseline, flash)
        return image

    def _text(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int],
              segments: Sequence[tuple[str, str | None]], size: int) -> None:
        """Wrapped, highlighted text in ``box``; when it overflows, the latest lines are kept."""
        font, line_h = _font(size), _line_height(size)
        x0, y0, x1, y1 = box
        lines = _wrap(segments, font, x1 - x0 - 24)
        visible = max(int((y1 - y0 - 16) // line_h), 1)
        lines = lines[-visible:]
        for row, line in enumerate(lines):
            y = y0 + 8 + row * line_h
            for run in line:
                tint = {"accepted": ACCEPTED_TINT, "target": TARGET_TINT}.get(run.origin or "")
                if tint:
                    draw.rectangle((x0 + 12 + run.x, y, x0 + 12 + run.x + font.getlength(run.text), y + line_h - 3),
                                   fill=tint)
                draw.text((x0 + 12 + run.x, y + 2), run.text, font=font, fill=INK)

    def _acceptance_bars(self, draw: ImageDraw.ImageDraw, flash: SideView) -> None:
        axes = self.accept_axes
        bar_w = max((axes.right - axes.left) / self.flash_steps * 0.8, 1.0)
        per_step, accepted = flash.tokens_per_step[1:], flash.accepted_per_step[1:]
        for step, (tokens, drafts) in enumerate(zip(per_step, accepted, strict=True), start=1):
            x = axes.x(step)
            if drafts:
                draw.rectangle((x - bar_w / 2, axes.y(drafts), x + bar_w / 2, axes.y(0)), fill=ORANGE)
            if tokens > drafts:
                draw.rectangle((x - bar_w / 2, axes.y(tokens), x + bar_w / 2, axes.y(drafts)), fill=BLUE)

    def _speed_lines(self, draw: ImageDraw.ImageDraw, baseline: SideView, flash: SideView) -> None:
        axes = self.speed_axes
        for view, colour in ((baseline, GREY), (flash, ORANGE)):
            points = [(axes.x(t), axes.y(r)) for t, r in zip(view.times, view.rates, strict=True)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=3, joint="curve")
            for x, y in points[-1:]:
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)

    def _footer(self, draw: ImageDraw.ImageDraw, seconds: float, baseline: SideView, flash: SideView) -> None:
        y = HEIGHT - 62
        draw.line((MARGIN, y - 6, WIDTH - MARGIN, y - 6), fill=RULE, width=1)
        if seconds >= self.duration:
            headline, colour = _headline(self.summary), ORANGE if not self.summary.get("cancelled") else INK
        elif flash.done and not baseline.done:
            headline, colour = (f"FLASH done: {len(flash.tokens)} tokens in {flash.seconds:.1f} s · "
                                "autoregressive still writing…"), INK
        else:
            headline, colour = "Racing: both sides shown after the same amount of their own time", MUTED
        draw.text((MARGIN, y), _say(headline), font=_font(26, bold=True), fill=colour)
        draw.text((MARGIN, y + 36), _say(self.replay.machine), font=_font(13), fill=MUTED)

    # --- the result card -------------------------------------------------------------------

    def card(self) -> Image.Image:
        image = Image.new("RGB", (WIDTH, HEIGHT), PAPER)
        draw = ImageDraw.Draw(image)
        self._header(image, draw, "FLASH vs autoregressive decoding: the result", thumbnail=False)
        summary = self.summary
        left = MARGIN
        if self.replay.thumbnail is not None:
            thumb = self.replay.thumbnail.copy()
            thumb.thumbnail((340, 230))
            image.paste(thumb, (left, 92))
            draw.rectangle((left - 1, 91, left + thumb.width, 92 + thumb.height), outline=RULE)
            left += thumb.width + MARGIN
        speedup = summary.get("speedup")
        big = "—" if speedup is None else f"{speedup:.2f}×"
        draw.text((left, 84), _say(big), font=_font(96, bold=True), fill=ORANGE if speedup else INK)
        label_x = left + _font(96, bold=True).getlength(_say(big)) + 20
        draw.text((label_x, 112), _say(_speedup_words(summary)), font=_font(26, bold=True), fill=INK)
        draw.text((label_x, 150), _say(_verdict_words(summary)), font=_font(18), fill=MUTED)
        lines = [_numbers_line(summary), _rates_line(summary)]
        if self.replay.typical:
            lines.append(self.replay.typical)
        for row, line in enumerate(lines):
            draw.text((left, 204 + row * 30), _say(line), font=_font(19), fill=INK)
        draw.text((left, 204 + len(lines) * 30 + 6), _say(self.replay.machine), font=_font(14), fill=MUTED)
        top = CARD_TEXT_TOP - 28
        for column, (title, segments) in enumerate((("Autoregressive (baseline)", [(self.final_baseline.text, None)]),
                                                    ("FLASH", list(self.final_flash.segments)))):
            x = self._column_x(column)
            draw.text((x, top), title, font=_font(18, bold=True), fill=INK)
            box = (x, top + 28, x + self.panel_w, HEIGHT - MARGIN)
            draw.rounded_rectangle(box, radius=8, outline=RULE, width=2)
            self._text(draw, box, segments, self.card_text_size)
        _legend(draw, WIDTH - MARGIN, top + 2, (("accepted draft tokens", ACCEPTED_TINT),
                                                ("target's own tokens", TARGET_TINT)))
        return image


def _line_height(size: int) -> int:
    return round(size * 1.45)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _side_stats(view: SideView, flash: bool) -> str:
    if not view.times:
        return "prefill…"
    parts = [_count(len(view.tokens), "token"), f"{view.tokens_per_s:.1f} tokens/s"]
    if flash and view.steps:
        parts.insert(1, f"τ {(len(view.tokens) - 1) / view.steps:.2f}")
    return " · ".join(parts) + (" ✓" if view.done else "")


def _headline(summary: dict[str, Any]) -> str:
    if summary.get("cancelled"):
        return f"■ Stopped after {_count(summary['flash']['new_tokens'], 'token')} of FLASH"
    speedup = summary.get("speedup")
    if speedup is None:
        return "Finished"
    tau = summary.get("tau")
    head = f"⚡ FLASH {speedup:.2f}× {'faster than' if speedup >= 1 else 'the speed of'} autoregressive"
    check = {True: " · identical output ✓", False: " · outputs differ ✗"}.get(summary.get("identical"), "")
    return head + (f" · τ {tau:.2f}" if tau is not None else "") + check


def _speedup_words(summary: dict[str, Any]) -> str:
    speedup = summary.get("speedup")
    if summary.get("cancelled"):
        return "stopped before the end"
    if speedup is None:
        return "no speed-up measured"
    return "faster than autoregressive" if speedup >= 1 else "the autoregressive speed"


def _verdict_words(summary: dict[str, Any]) -> str:
    identical = summary.get("identical")
    if identical is True:
        return "identical output, token for token (temperature 0)"
    if identical is False:
        return f"outputs differ at token {summary.get('first_difference')}"
    if summary.get("temperature", 0) > 0:
        return f"sampling at temperature {summary['temperature']:g}: outputs differ by design"
    return "exactness unknown: stopped before the end"


def _numbers_line(summary: dict[str, Any]) -> str:
    tau, rate = summary.get("tau"), summary.get("acceptance_rate")
    if tau is None:
        return f"k = {summary.get('k')}"
    return (f"τ {tau:.2f} tokens per target pass · {100 * rate:.0f} % of drafts accepted · "
            f"k = {summary.get('k')}")


def _rates_line(summary: dict[str, Any]) -> str:
    base, flash = summary["baseline"], summary["flash"]
    return (f"autoregressive {base['tokens_per_s']:.1f} tokens/s ({base['seconds']:.1f} s) · "
            f"FLASH {flash['tokens_per_s']:.1f} tokens/s ({flash['seconds']:.1f} s) · "
            f"{_count(flash['new_tokens'], 'token')}")

