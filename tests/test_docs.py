"""Docs that cannot go stale: every `llamaforge ...` command in README.md and docs/ parses with the
real argument parser and names real config fields, every preset named exists, every relative link
and repository path resolves."""

import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

from llamaforge.cli import _split_overrides, build_parser
from llamaforge.config import ModelConfig, TrainConfig, preset_names

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = {"model": {f.name for f in fields(ModelConfig)}, "train": {f.name for f in fields(TrainConfig)}}


def commands(doc: Path) -> list[str]:
    """`llamaforge ...` lines of the fenced code blocks (continuation lines joined, comments dropped)."""
    out, block, pending = [], False, ""
    for line in doc.read_text().splitlines():
        if line.strip().startswith("```"):
            block, pending = not block, ""
            continue
        if not block:
            continue
        text = pending + " " + line.strip() if pending else line.strip().removeprefix("$ ")
        if text.endswith("\\"):
            pending = text[:-1]
            continue
        pending = ""
        if text.startswith("llamaforge "):
            out.append(text)
    return out


CASES = [(doc.relative_to(ROOT), cmd) for doc in DOCS for cmd in commands(doc)]


def test_the_docs_hold_commands_to_check():
    assert len(CASES) >= 20 and {d for d, _ in CASES} >= {Path("README.md")}


@pytest.mark.parametrize("doc, cmd", CASES, ids=[f"{d}:{c[:60]}" for d, c in CASES])
def test_every_command_parses_with_the_real_parser(doc, cmd):
    argv = shlex.split(cmd, comments=True)[1:]
    if "--help" in argv or "-h" in argv:
        return
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)  # an unknown flag or a bad value raises (one line, UserError)
    for item in overrides:
        key = item.split("=", 1)[0]
        section, _, name = key.partition(".")
        assert name in SECTIONS.get(section, ()), f"{doc}: `{cmd}` names --{key}, not a config field"
    preset = getattr(args, "preset", None)
    assert preset is None or preset in preset_names(), f"{doc}: `{cmd}` names preset {preset!r}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:src|tests|benchmarks|configs|docs|examples)/[A-Za-z0-9_./-]+)`")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_and_repository_path_resolves(doc):
    text = doc.read_text()
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            missing.append(target)
    for path in REPO_PATH.findall(text):
        path = path.rstrip(".")
        if re.search(r"(^|/)[A-Z_]+(\.|/|$)", path):  # a placeholder (configs/NAME.yaml, step_N)
            continue
        if not (ROOT / path).exists():
            missing.append(path)
    assert missing == [], f"{doc.name}: {missing}"


def test_every_preset_named_in_the_docs_exists():
    named = {m for doc in DOCS for m in re.findall(r"--preset\s+([a-z0-9][a-z0-9.-]*)", doc.read_text())}
    assert named and named <= set(preset_names()), named - set(preset_names())


def test_the_docs_name_every_registered_extension():
    """The docs' tables cannot silently miss a check, schedule, optimizer, offline task or preset."""
    from llamaforge.eval.tasks import BENCHES, CAPABILITY_SET
    from llamaforge.modelcheck import CHECKS
    from llamaforge.train.optim import OPTIMIZERS
    from llamaforge.train.schedules import SCHEDULES

    text = "\n".join(doc.read_text() for doc in DOCS)
    own = (ROOT / "docs" / "own-model.md").read_text()
    assert [c for c in CHECKS if f"`{c}`" not in own] == []
    for names in (SCHEDULES, OPTIMIZERS, BENCHES, CAPABILITY_SET, preset_names()):
        assert [n for n in names if n not in text] == [], names
