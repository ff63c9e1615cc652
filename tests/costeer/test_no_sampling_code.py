"""No token-choice code under costeer/: every token is picked by a costeer_kernels op.

Scans the source of costeer/**/*.py for calls that choose tokens or draw random numbers in torch
(multinomial, sort/argsort, argmax/max-index, topk, rand*, bernoulli, exponential_, Gumbel noise,
softmax followed by a cumulative sum). Two files are exempt, for the reasons given.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "costeer")

FORBIDDEN_CALLS = {"multinomial", "sort", "argsort", "argmax", "topk", "rand", "rand_like", "randn", "randn_like",
                   "randint", "bernoulli", "exponential_", "geometric_", "cumsum", "gumbel_softmax"}
# name -> (allowed calls, why)
EXEMPT = {
    "reference_loop.py": ({"argmax"}, "the paper's plain loop, kept literal as the baseline of tests and bench/"),
    "serve/protocol.py": ({"topk"}, "the server's top-k wire format (which tokens are sent), not a token choice"),
}


def _sources():
    for folder, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else None)
            if name is not None:
                yield name, node.lineno


def find_sampling_code(path):
    with open(path, encoding="utf-8") as f:
        src = f.read()
    tree = ast.parse(src)
    allowed = EXEMPT.get(os.path.relpath(path, PKG), (set(), ""))[0]
    hits = [(n, line) for n, line in _calls(tree) if n in FORBIDDEN_CALLS and n not in allowed]
    if "-torch.log(-torch.log" in src.replace(" ", "") or "log(-torch.log(" in src.replace(" ", ""):
        hits.append(("gumbel noise", 0))
    return hits


@pytest.mark.parametrize("path", sorted(_sources()), ids=lambda p: os.path.relpath(p, PKG))
def test_no_sampling_code_under_costeer(path):
    hits = find_sampling_code(path)
    assert not hits, (f"{os.path.relpath(path, ROOT)} chooses tokens or draws random numbers itself at "
                      f"{hits}; use costeer_kernels (steer_sample, steer_from_hidden(sample=...), verify)")


def test_the_scan_finds_sampling_code(tmp_path):
    """The scan can fail: the old loop's sampler is caught."""
    p = tmp_path / "old.py"
    p.write_text("import torch\n"
                 "def choose(logp, g):\n"
                 "    sp, si = torch.sort(logp.softmax(-1), descending=True)\n"
                 "    return int(torch.multinomial(sp, 1, generator=g)), logp.argmax(-1).tolist()\n")
    names = {n for n, _ in find_sampling_code(str(p))}
    assert {"sort", "multinomial", "argmax"} <= names
