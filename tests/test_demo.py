"""A reduced `llamaforge demo` end to end: every step runs, the last line is the report's path."""

from helpers import run_cli


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = run_cli("demo", "--quick", "--out", out, check_rc=0, timeout=900)
    lines = done.stdout.strip().splitlines()
    report = out / "report" / "report.md"
    assert lines[-1] == str(report) and report.exists()
    for step in ("prepare", "train", "extend", "eval", "generate", "report"):
        assert any(line.startswith(f"$ llamaforge {step} ") for line in lines), step
    text = report.read_text()
    assert "## Long context (extend)" in text and "interpolation + fine-tune" in text
    for png in ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png", "positions_extend.png"):
        assert (out / "report" / png).stat().st_size > 5000
    assert (out / "report" / "report.html").read_text().count("<img") == 5
    assert (out / "extend" / "final" / "README.md").exists()
