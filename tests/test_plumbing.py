"""Every copy of a shared helper is byte-identical in every script of cleanrl_style/ (shared/CONVENTIONS.md).

A script is self-contained, so the plumbing (checkpoints, run directory, signals, progress bar, ...) is copied
from ppo.py into each. This test parses every script and compares, for each top-level function or class name that
two scripts both define, the exact source text (docstring and comments included), except for the names below.
"""

import ast
import itertools

import pytest
from conftest import SCRIPTS

# Names that are the algorithm's own by nature, so each script has its own version.
ALGORITHM_SPECIFIC = {
    "Args",  # the script's flags
    "main",  # the training loop
    "evaluate",  # the deterministic policy of this algorithm's agent
    "resolve_args",  # defaults and checks of this algorithm's hyperparameters
    "make_env",  # a vector of envs (ppo) or one env (the tabular scripts)
}
# Helpers every training script must carry (the contract's plumbing).
REQUIRED = [
    "UsageError", "RunFault", "env_spaces", "check_common_args", "load_checkpoint", "save_checkpoint",
    "resume_args", "start_run", "StopSignal", "Monitor", "end_run", "cli",
]  # fmt: skip


def definitions(source: str) -> dict:
    """{name: exact source text} of the top-level functions and classes, decorators included."""
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = "\n".join(lines[first - 1 : node.end_lineno])
    return out


def differing_helpers(sources: dict) -> list:
    """[(helper, script_a, script_b)] for each shared name whose two copies differ."""
    defs = {name: definitions(src) for name, src in sources.items()}
    found = []
    for a, b in itertools.combinations(sorted(defs), 2):
        for helper in sorted((defs[a].keys() & defs[b].keys()) - ALGORITHM_SPECIFIC):
            if defs[a][helper] != defs[b][helper]:
                found.append((helper, a, b))
    return found


def script_sources() -> dict:
    return {p.name: p.read_text() for p in sorted(SCRIPTS.glob("*.py")) if not p.name.startswith("_")}


def test_shared_helpers_are_identical_in_every_script():
    found = differing_helpers(script_sources())
    assert not found, "copies differ (copy the helper from ppo.py):\n" + "\n".join(
        f"  {helper}: {a} and {b}" for helper, a, b in found
    )


@pytest.mark.parametrize(
    "script", sorted(p.name for p in SCRIPTS.glob("*.py") if p.stem not in ("__init__", "evaluate"))
)
def test_every_training_script_carries_the_plumbing(script):
    missing = [name for name in REQUIRED if name not in definitions((SCRIPTS / script).read_text())]
    assert not missing, f"{script} lacks {missing}"


def test_a_one_character_change_to_one_copy_is_caught():
    sources = script_sources()
    assert len(sources) >= 3
    for helper in ["save_checkpoint", "StopSignal", "Monitor"]:
        target = "q_learning.py"
        text = definitions(sources[target])[helper]
        # change one character inside the helper (a space into a tab in its last line)
        i = text.rindex(" ")
        changed = text[:i] + "\t" + text[i + 1 :]
        mutated = dict(sources, **{target: sources[target].replace(text, changed)})
        found = differing_helpers(mutated)
        assert (helper, "ppo.py", target) in found, found
        assert all(h == helper for h, _, _ in found)


def test_an_algorithm_specific_name_is_not_compared():
    sources = script_sources()
    text = definitions(sources["sarsa.py"])["main"]
    mutated = dict(sources, **{"sarsa.py": sources["sarsa.py"].replace(text, text + "\n    # changed")})
    assert differing_helpers(mutated) == []


def test_definitions_reads_exact_source():
    src = "import x\n\n\n@dec\ndef f(a):\n    # note\n    return a\n\n\nclass C:\n    pass\n"
    assert definitions(src) == {"f": "@dec\ndef f(a):\n    # note\n    return a", "C": "class C:\n    pass"}
