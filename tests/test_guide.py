"""The learner's guide (cleanrl_style/README.md) and the notation guide stay true to the code they point at."""

import re

import pytest
from conftest import ROOT, SCRIPTS, TRAINING_SCRIPTS

GUIDE = SCRIPTS / "README.md"
LINK = re.compile(r"\[`(?:\w+\.)?(\w+)(?:\(\))?`\]\((\w+\.py)#L(\d+)\)")


def links(text: str) -> list:
    return [(name, file, int(line)) for name, file, line in LINK.findall(text)]


def test_every_equation_link_points_at_its_definition():
    found = links(GUIDE.read_text())
    assert len(found) >= 20, found
    wrong = []
    for name, file, line in found:
        lines = (SCRIPTS / file).read_text().splitlines()
        text = lines[line - 1] if 0 < line <= len(lines) else ""
        if not re.match(rf"\s*(def|class) {name}\b", text):
            wrong.append(f"{file}#L{line} is not `{name}`: {text.strip()[:60]!r}")
    assert not wrong, "\n".join(wrong)


def test_the_link_check_catches_a_moved_function():
    assert links("see [`gae()`](ppo.py#L12) and [`Agent.value`](ppo.py#L3)") == [
        ("gae", "ppo.py", 12),
        ("value", "ppo.py", 3),
    ]


def test_the_guide_covers_every_script_in_reading_order():
    text = GUIDE.read_text()
    order = ["q_learning", "sarsa", "dqn", "reinforce", "a2c", "trpo", "ppo", "grpo"]
    assert sorted(order) == sorted(TRAINING_SCRIPTS)
    positions = [text.find(f"{name}.py") for name in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_the_notation_guide_the_docstrings_cite_is_in_the_repo(script):
    source = (SCRIPTS / f"{script}.py").read_text()
    if "NOTATION.md" in source:
        assert (SCRIPTS / "NOTATION.md").is_file()


def test_the_readme_first_screen_has_the_two_commands_and_the_start():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:45])
    assert "cleanrl_style/ppo.py --env CartPole-v1" in first_screen
    assert "pytest" in first_screen and "cleanrl_style/README.md" in first_screen
    assert "tensorboard --logdir runs" in first_screen and "--capture-video" in first_screen
