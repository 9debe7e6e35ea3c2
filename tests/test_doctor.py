"""``python -m flash doctor``: a real run on tiny LLaVA / Qwen2.5-VL (loaded as a hub checkpoint is) and on
the default model; a broken tree pass is reported with its position and top-2 gap and fails the run."""

from __future__ import annotations

import pytest
import torch

from flash import cli, models
from flash.doctor import DoctorReport, MethodCheck, format_report
from flash.engine.near_ties import near_tie_tolerance
from flash.targets.hf import HFTarget

METHOD_NAMES = ("ar", "eagle", "flash", "flash-tree", "pld")


def doctor(capsys, *args: str) -> tuple[int, list[str], str]:
    code = cli.main(["doctor", "--max-new-tokens", "12", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def method_line(lines: list[str], method: str) -> str:
    return next(line for line in lines if line.split()[:1] == [method])


def tau(line: str) -> float:
    return float(line.split(" tau ")[1].split()[0])


@pytest.mark.parametrize("tiny,attention", [("llava", "sdpa"), ("qwen2.5-vl", "eager")])
def test_doctor_on_a_tiny_target_checks_every_method(capsys, tiny, attention) -> None:
    code, lines, err = doctor(capsys, "--tiny", tiny, "--attention", attention)
    assert code == 0, "\n".join(lines) + err
    assert lines[0].startswith("target   ") and f"{attention} attention" in lines[0] and "float32" in lines[0]
    assert "-tiny-" in lines[0] and "draft trees: verified" in lines[0]
    assert lines[1] == "devices  inputs cpu, outputs cpu, draft cpu"
    for method in METHOD_NAMES:
        line = method_line(lines, method)
        assert " 12 tokens " in line and " tokens/s " in line and " tau " in line
        assert line.endswith("(the reference)" if method == "ar" else "same tokens as ar"), line
    assert any(tau(method_line(lines, m)) > 1 for m in ("flash", "flash-tree"))  # the echo draft is accepted
    assert lines[-2].startswith("memory   peak RSS ") and lines[-1] == "result   OK: every method gives ar's tokens"


def test_doctor_reports_a_broken_tree_pass_and_fails(capsys, monkeypatch) -> None:
    """The bug the doctor is there for: a boolean tree mask on eager attention (added to the scores, it
    masks nothing). flash-tree's difference is named with its position and top-2 gap; exit status 1."""
    monkeypatch.setattr(HFTarget, "_tree_mask", lambda self, mask: mask.to(self.device)[None, None])
    code, lines, err = doctor(capsys, "--tiny", "llava", "--attention", "eager")
    assert code == 1 and "error: greedy output differs from ar" in err
    tree = method_line(lines, "flash-tree")
    assert "DIFFERS from ar at token " in tree and "top-2 gap " in tree and "rounding there ~" in tree
    assert method_line(lines, "flash").endswith("same tokens as ar")  # chains take no tree mask
    assert lines[-1].startswith("result   FAIL: flash-tree")


def test_doctor_on_an_embedded_model(capsys, monkeypatch, smollm2_target) -> None:
    """An embedded model (SmolLM2), its shipped draft (the session's target stands in for the cache's load)."""
    monkeypatch.setattr(models, "_TARGETS", {"smollm2": smollm2_target})
    monkeypatch.setattr(models, "_DRAFTS", {})
    code, lines, err = doctor(capsys, "--model", "smollm2")
    assert code == 0, "\n".join(lines) + err
    assert lines[0].startswith(f"target   {smollm2_target.name} (EmbeddedTarget), float32 activations")
    for method in METHOD_NAMES:
        assert method_line(lines, method).endswith("(the reference)" if method == "ar" else "same tokens as ar")
    assert tau(method_line(lines, "flash")) > 1  # the trained draft is accepted
    assert lines[-1] == "result   OK: every method gives ar's tokens"


@pytest.mark.parametrize("args,message", [
    (("--tiny", "llava", "--model", "x/y"), "give --model or --tiny, not both"),
    (("--attention", "eager"), "--attention applies to LLaVA / Qwen2.5-VL targets"),
    (("--tiny", "llava", "--max-new-tokens", "1"), "--max-new-tokens must be >= 2"),
    (("--tiny", "llava", "--media", "no-such-file.jpg"), "no-such-file.jpg"),
])
def test_doctor_refuses_bad_arguments_in_one_line(capsys, args, message) -> None:
    code = cli.main(["doctor", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_near_ties_are_labelled_by_the_dtypes_rounding() -> None:
    assert near_tie_tolerance(20.0, torch.bfloat16) == pytest.approx(2 * 2**-7 * 20)
    assert near_tie_tolerance(20.0, torch.float32) == 1e-3
    checks = (MethodCheck("ar", 8, 10.0, 1.0),
              MethodCheck("flash", 8, 12.0, 1.5, first_difference=5, top2_gap=0.1, tolerance=0.31),
              MethodCheck("eagle", 8, 11.0, 1.4, first_difference=2, top2_gap=1.5, tolerance=0.31),
              MethodCheck("flash-tree", 0, 0.0, 0.0, skipped="flash_attention_2 attention takes no tree mask"))
    report = DoctorReport("m", "LlavaTarget", "bfloat16", "flash_attention_2", False, "cuda:0", "cuda:1",
                          "cuda:0", "cuda:0 20, cuda:1 18", "cat.jpg", "greedy, 8 new tokens", checks,
                          "peak RSS 1.00 GiB")
    lines = format_report(report)
    assert "draft trees: not verified" in lines[0]
    assert lines[1] == "devices  inputs cuda:0, outputs cuda:1, draft cuda:0; modules per device: cuda:0 20, cuda:1 18"
    assert "a near-tie flip (rounding)" in method_line(lines, "flash")
    assert "NOT a near-tie (a bug)" in method_line(lines, "eagle")
    assert method_line(lines, "flash-tree").endswith("skipped: flash_attention_2 attention takes no tree mask")
    assert not report.ok and lines[-1] == "result   FAIL: flash, eagle differ from ar (see above)"
