"""The real app (``python app.py`` in a subprocess) driven through gradio_client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import write_video

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
# Output order of the race endpoint (app.OUTPUTS).
STATUS, AR_STATS, AR_TEXT, FLASH_STATS, FLASH_TEXT, ACCEPT_PLOT, SPEED_PLOT, SUMMARY_MD, SUMMARY_JSON = range(9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(log_path: Path, timeout_s: float = 120) -> Iterator[str]:
    """``python app.py`` on a free port (one intra-op thread: the test machine is small and busy; one
    calibration race at start-up instead of three)."""
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "FLASH_CALIBRATION_RACES": "1"}
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not answer within {timeout_s} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(smollm2_target, tmp_path_factory):
    """A gradio_client on the real app (skipped with the default target when its weights are unavailable)."""
    gradio_client = pytest.importorskip("gradio_client")
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(log_path) as url:
        client = gradio_client.Client(url, verbose=False)
        client.log_path, client.url = log_path, url  # for tests that read the server's log or open a session
        yield client


def _race_args(path: Path, *, max_new_tokens: int = 16, temperature: float = 0.0) -> tuple:
    from gradio_client import handle_file

    return (handle_file(str(path)), "", "default", max_new_tokens, temperature, 1.0, 4, 0)


def _is_update(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"  # gr.skip(): value unchanged


def _flash_text(value) -> str:
    return "".join(item["token"] for item in value)


def test_race_streams_both_sides_and_summarises(client):
    job = client.submit(*_race_args(EXAMPLES / "cat.jpg"), api_name="/race")
    final = job.result(timeout=240)
    outputs = job.outputs()

    summary = final[SUMMARY_JSON]
    assert {"speedup", "tau", "acceptance_rate", "identical", "baseline", "flash"} <= summary.keys()
    assert summary["identical"] is True and summary["speedup"] > 0 and summary["tau"] >= 1
    for side in ("baseline", "flash"):
        assert {"new_tokens", "steps", "seconds", "tokens_per_s"} <= summary[side].keys()
        assert 0 < summary[side]["new_tokens"] <= 16
    assert final[AR_TEXT] and final[AR_TEXT] == _flash_text(final[FLASH_TEXT])
    assert "identical" in final[SUMMARY_MD] and "Finished" in final[STATUS]
    assert final[ACCEPT_PLOT]["type"] == final[SPEED_PLOT]["type"] == "plotly"
    # Beside this race's figure, what this machine typically gives (the start-up's warm race), and
    # whether this race ran on a busy machine (a reason, or None).
    assert summary["typical"].startswith("typically") and summary["typical_speedup"] > 0
    assert f"FLASH {summary['typical']}" in final[SUMMARY_MD]
    assert summary["disturbed"] is None or ("Disturbed" in final[SUMMARY_MD] and summary["disturbed"])

    # Both texts streamed: some outputs carry partial texts, growing towards the final ones.
    ar_texts = [o[AR_TEXT] for o in outputs if not _is_update(o[AR_TEXT]) and o[AR_TEXT]]
    flash_texts = [_flash_text(o[FLASH_TEXT]) for o in outputs if not _is_update(o[FLASH_TEXT]) and o[FLASH_TEXT]]
    assert any(len(t) < len(final[AR_TEXT]) for t in ar_texts)
    assert any(len(t) < len(final[AR_TEXT]) for t in flash_texts)
    assert all(final[AR_TEXT].startswith(t) for t in ar_texts + flash_texts)
    # The summary only arrives at the end.
    assert all(_is_update(o[SUMMARY_JSON]) or o[SUMMARY_JSON] is None for o in outputs[:-1])


def test_bad_media_gives_a_clear_error_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client.exceptions import AppError

    fake = tmp_path / "notes.mp4"
    fake.write_text("this is a text file, not a video\n")
    with pytest.raises(AppError, match=r"'notes\.mp4' .*(image|video)") as err:
        client.predict(*_race_args(fake), api_name="/race")
    assert "\n" not in str(err.value)

    with pytest.raises(AppError, match="Upload an image or a video"):
        client.predict(None, "", "default", 8, 0, 1, 4, 0, api_name="/race")

    from PIL import Image

    huge = tmp_path / "huge.png"  # 90 M pixels: over Pillow's warning size, a few KB as a 1-bit PNG
    Image.new("1", (10_000, 9_000)).save(huge)
    with pytest.raises(AppError, match=r"'huge\.png' is 10000x9000 pixels, over the limit"):
        client.predict(*_race_args(huge), api_name="/race")

    final = client.predict(*_race_args(EXAMPLES / "coffee_pan.mp4", max_new_tokens=6), api_name="/race")
    assert final[SUMMARY_JSON]["identical"] is True and final[AR_TEXT]

    # Each refusal is one line in the server's log, without a traceback.
    log = client.log_path.read_text()
    lines = [line for line in log.splitlines() if "notes.mp4" in line]
    assert len(lines) == 1 and "refused: 'notes.mp4' is not an image or video" in lines[0]
    assert "Traceback" not in log and "DecompressionBombWarning" not in log


def test_unavailable_model_gives_a_clear_error(client):
    import torch
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    if torch.cuda.is_available():
        pytest.skip("with a GPU, the hub presets may load for real")
    with pytest.raises(AppError, match="needs a CUDA GPU"):
        client.predict(handle_file(str(EXAMPLES / "cat.jpg")), "", "llava-hf/llava-1.5-7b-hf", 8, 0, 1, 4, 0,
                       api_name="/race")


def test_stop_ends_the_race_promptly(client):
    job = client.submit(*_race_args(EXAMPLES / "coffee.jpg", max_new_tokens=400), api_name="/race")
    deadline = time.monotonic() + 120
    while not any(not _is_update(o[AR_TEXT]) and o[AR_TEXT] for o in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), "the race never streamed any text"
        time.sleep(0.1)
    stopped = time.monotonic()
    assert client.predict(api_name="/stop").startswith("■ Stopped")
    final = job.result(timeout=60)
    assert time.monotonic() - stopped < 10
    summary = final[SUMMARY_JSON]
    assert summary["cancelled"] is True
    assert summary["baseline"]["new_tokens"] < 400
    # The page says what happened: after how many tokens, with the partial figures, each side marked.
    flash_tokens, base_tokens = summary["flash"]["new_tokens"], summary["baseline"]["new_tokens"]
    # On a loaded machine FLASH may have emitted a single token when the stop lands: "1 token".
    flash_count = f"{flash_tokens} {'token' if flash_tokens == 1 else 'tokens'}"
    assert final[STATUS] == f"■ Stopped after {flash_count} of FLASH and {base_tokens} of autoregressive"
    assert final[SUMMARY_MD].startswith(f"### ■ Stopped after {flash_count}")
    assert f"| new tokens | {base_tokens} | {flash_tokens} |" in final[SUMMARY_MD]
    assert final[AR_STATS].endswith("■ stopped") and final[FLASH_STATS].endswith(("■ stopped", "✓"))


def test_stop_with_no_race_running_changes_nothing(client):
    assert _is_update(client.predict(api_name="/stop"))  # nothing to stop: the status keeps its text
    final = client.predict(*_race_args(EXAMPLES / "cat.jpg", max_new_tokens=4), api_name="/race")
    assert final[STATUS].startswith("Finished")
    assert _is_update(client.predict(api_name="/stop"))  # "Finished: ..." stays


def test_replay_gives_an_mp4_a_gif_and_a_card_of_the_last_race(client):
    import av
    import numpy as np
    from gradio_client import Client
    from PIL import Image

    final = client.predict(*_race_args(EXAMPLES / "cat.jpg", max_new_tokens=16), api_name="/race")
    status, files = client.predict(api_name="/replay")
    assert status.startswith("✓ Replay ready")
    paths = {Path(f).suffix: Path(f) for f in files["value"]}
    assert sorted(paths) == [".gif", ".mp4", ".png"]
    with av.open(str(paths[".mp4"])) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        seconds = len(frames) / float(stream.average_rate)
        assert stream.codec_context.name == "h264"
    summary = final[SUMMARY_JSON]
    race_seconds = max(summary["baseline"]["seconds"], summary["flash"]["seconds"])
    assert abs(seconds - race_seconds) <= max(0.1 * race_seconds, 1 / 15), (seconds, race_seconds)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1  # the race moves
    for suffix, kind in ((".gif", "GIF"), (".png", "PNG")):
        with Image.open(paths[suffix]) as image:
            assert image.format == kind and image.size == (1280, 720)

    other = Client(client.url, verbose=False)  # another visitor: no race of theirs to replay yet
    status, _ = other.predict(api_name="/replay")
    assert status.startswith("✗ Race first")


def test_build_demo_wraps_the_race_for_spaces_gpu_when_available(monkeypatch):
    """On HuggingFace Spaces the race runs under ``spaces.GPU``; elsewhere it is the plain function."""
    import importlib
    import types

    import app  # the repository root is on sys.path (conftest)

    wrapped = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration=None: lambda fn: wrapped.append(fn) or fn
    monkeypatch.setitem(sys.modules, "spaces", fake)
    try:
        importlib.reload(app).build_demo()
        assert wrapped == [app.race_from_page, app.run_race]  # the page's race and the API's
    finally:
        monkeypatch.delitem(sys.modules, "spaces")
        importlib.reload(app)
    demo = app.build_demo()
    assert any(fn.api_name == "race" for fn in demo.fns.values())


# --- the page's handlers, in this process --------------------------------------------------------


def _last(outputs):
    return list(outputs)[-1]


def test_upload_check_refuses_a_bad_file_at_once(tmp_path):
    import app

    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a picture\n")
    status, image, video = _last(app.check_upload(str(fake)))
    assert status.startswith("✗ 'notes.png' ") and "\n" not in status
    assert not image.visible and not video.visible and image.value is None and video.value is None  # no preview
    status, image, video = _last(app.check_upload(None))  # the file removed: the message stays shown
    assert _is_update(status) and not image.visible

    status, image, video = _last(app.check_upload(str(EXAMPLES / "cat.jpg")))  # a new file replaces it
    assert status.startswith("✓ cat.jpg: image, ") and image.visible and not video.visible
    assert image.value["orig_name"] == "cat.jpg"


def test_upload_check_makes_a_playable_preview_for_an_mpeg4_part2_clip(tmp_path):
    import av

    import app

    # MPEG-4 Part 2, as many cameras export: browsers cannot play it
    clip = write_video(tmp_path / "camera.mp4", "mpeg4", frames=20, size=(96, 64), gray=lambda i: 10 * i,
                       bit_rate=2_000_000)
    updates = list(app.check_upload(str(clip)))
    assert "making a preview" in updates[0][0]
    status, image, video = updates[-1]
    assert status.startswith("✓ camera.mp4: video, 2.0 s") and "re-encoded as H.264" in status
    assert video.visible and not image.visible
    with av.open(video.value["path"]) as preview:
        assert preview.streams.video[0].codec_context.name == "h264"

    status, _, video = _last(app.check_upload(str(EXAMPLES / "cat_pan.mp4")))  # H.264 already: shown as is
    assert "re-encoded" not in status and video.value["orig_name"] == "cat_pan.mp4"


def test_upload_check_shows_a_tiff_as_png(tmp_path):
    from PIL import Image

    import app

    tiff = tmp_path / "scan.tiff"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tiff)
    status, image, _ = _last(app.check_upload(str(tiff)))
    assert status == "✓ scan.tiff: image, 40×30" and image.value["path"].endswith(".png")


def test_gpu_presets_are_offered_only_with_a_gpu(monkeypatch):
    import app

    monkeypatch.setattr(app.torch.cuda, "is_available", lambda: False)
    choices, note = app._model_choices()
    assert [target for _, target in choices] == [p.target for p in app.PRESETS if not p.needs_gpu]
    assert "LLaVA-1.5-7B" in note and "CUDA GPU" in note
    monkeypatch.setattr(app.torch.cuda, "is_available", lambda: True)
    choices, note = app._model_choices()
    assert len(choices) == len(app.PRESETS) and note is None


def test_disturbance_names_a_busy_machine(monkeypatch):
    import app
    from flash.race import RaceRecording, SideView

    def recording(step_s: float) -> RaceRecording:
        times = tuple(0.5 + step_s * i for i in range(11))  # a 0.5 s prefill, then 10 steps
        view = SideView("ar", tuple(range(11)), "", (), times[-1], True, times, tuple(range(1, 12)), (0,) * 11)
        return RaceRecording((view,), (), {"model": "m"})

    calibration = app.Calibration("m", (2.0, 2.2, 2.1), ar_step_s=0.1)
    assert app.ar_step_seconds(recording(0.1)) == pytest.approx(0.1)
    cores = os.cpu_count()
    monkeypatch.setattr(app.os, "getloadavg", lambda: (cores - 0.5, 0.0, 0.0))
    assert app.disturbance(recording(0.12), calibration) is None
    assert app.disturbance(recording(0.2), calibration) == "autoregressive steps took 2.0× their calibrated time"
    monkeypatch.setattr(app.os, "getloadavg", lambda: (cores + 1.5, 0.0, 0.0))
    assert app.disturbance(recording(0.1), calibration) == f"load average {cores + 1.5:.1f} on {cores} cores"
    assert calibration.typical == 2.1 and calibration.line().startswith("typically 2.10× on this machine (3 warm")


def test_the_page_s_race_reports_errors_in_the_status_and_presents_an_example(smollm2_target, single_thread):
    import app

    def final(*args):
        return dict(zip(app.UI_OUTPUTS, list(app.race_from_page(*args))[-1], strict=True))

    refused = final(None, "", "default", 4, 0, 1, 4, 0, False)
    assert refused["status"] == "✗ Upload an image or a video first (or click one of the examples)."
    assert all(_is_update(value) for name, value in refused.items() if name != "status")  # nothing else touched

    presented = final(None, "", "default", 4, 0, 1, 4, 0, True)  # presentation mode: the first example
    assert presented["status"].startswith("Finished") and presented["summary_json"]["identical"] is True
    assert presented["last_race"].media_name == "cat.jpg" and presented["replay_button"].interactive
    assert presented["headline"].startswith("## ⚡ FLASH")


def test_start_up_warm_up_calibrates_and_the_page_shows_its_progress(smollm2_target, single_thread, monkeypatch):
    import app

    warmup = app.Warmup()
    monkeypatch.setattr(app, "WARMUP", warmup)
    page = app.prepare("default")
    warmup.started, warmup.stage = True, "calibrating: warm race 1 of 1"  # as start() leaves it, not yet done
    assert next(page)[0] == "… Preparing the models: calibrating: warm race 1 of 1"

    warmup.started = False
    warmup.start(races=1)  # the real thing: load, one short race, one warm race
    assert warmup.wait(600) and warmup.error is None and warmup.stage == "ready"
    calibration = warmup.calibration
    assert len(calibration.speedups) == 1 and calibration.speedups[0] > 0 and calibration.ar_step_s > 0
    status, k = list(page)[-1]
    assert status.startswith("✓ Ready: Default") and f"FLASH {calibration.line()}" in status and k.maximum >= 1
