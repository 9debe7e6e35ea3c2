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
    """``python app.py`` on a free port (one intra-op thread: the test machine is small and busy)."""
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
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
def client(default_target, tmp_path_factory):
    """A gradio_client on the real app (skipped with the default target when its weights are unavailable)."""
    gradio_client = pytest.importorskip("gradio_client")
    with running_app(tmp_path_factory.mktemp("app") / "app.log") as url:
        yield gradio_client.Client(url, verbose=False)


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

    final = client.predict(*_race_args(EXAMPLES / "coffee_pan.mp4", max_new_tokens=6), api_name="/race")
    assert final[SUMMARY_JSON]["identical"] is True and final[AR_TEXT]


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
    assert final[SUMMARY_JSON]["cancelled"] is True
    assert final[SUMMARY_JSON]["baseline"]["new_tokens"] < 400


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
        assert wrapped == [app.run_race]
    finally:
        monkeypatch.delitem(sys.modules, "spaces")
        importlib.reload(app)
    demo = app.build_demo()
    assert any(fn.api_name == "race" for fn in demo.fns.values())
