"""`costeer generate --output/--resume` against damaged journals, full disks, odd paths and a changed
LLM (issue 18): each ends with a clear message (never a traceback), loses no text, and never
splices two different generations."""
import json
import os
import resource
import subprocess
import sys

import pytest

from costeer.cli import main as cli_main
from tests.costeer.conftest import ROOT
from tests.costeer.test_faults import Served
from tests.costeer.tiny import free_port, make_tiny_model

PROMPT, CONTEXT = "Suggest a weekend activity.", "I love hiking and I live in Zurich."
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")


@pytest.fixture
def keep_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(tiny_dir, n=8):
    return ["generate", "--llm", tiny_dir, "--slm", tiny_dir, "--prompt", PROMPT, "--context", CONTEXT,
            "--max-new-tokens", str(n), "--threads", "1", "--quiet"]


def _unfinish(journal):
    """Drop the journal's "done" line: as if the run had been interrupted at its end."""
    lines = journal.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1]).get("done")
    journal.write_text("".join(lines[:-1]))


@pytest.mark.parametrize("bad", ['{"t": 5}', "5", '{"t": "x", "b": 1}', '{"t": null, "b": 1}', '{"t": 5, "b": -1}',
                                 '["t", 5]'])
def test_damaged_journal_lines_get_a_clear_message(tiny_dir, tmp_path, capsys, keep_threads, bad):
    out = tmp_path / "out.txt"
    assert cli_main(_args(tiny_dir) + ["--output", str(out)]) == 0
    text = out.read_bytes()
    journal = tmp_path / "out.txt.journal"
    _unfinish(journal)
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:4] + [bad + "\n"] + lines[4:]))
    capsys.readouterr()
    assert cli_main(_args(tiny_dir) + ["--output", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "line 5 is not a journal record" in err and "damaged" in err and str(out) in err, err
    assert out.read_bytes() == text  # nothing cut, nothing lost


def test_full_disk_keeps_the_text_and_resume_completes(tiny_dir, tmp_path, keep_threads):
    ref = tmp_path / "ref.txt"
    assert cli_main(_args(tiny_dir, 40) + ["--output", str(ref)]) == 0
    out = tmp_path / "out.txt"

    def small_files():  # writes past 800 bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (800, 800))

    proc = subprocess.run([sys.executable, "-m", "costeer"] + _args(tiny_dir, 40) + ["--output", str(out)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "cannot write" in proc.stderr and "--resume" in proc.stderr
    assert ref.read_text(encoding="utf-8").startswith(out.read_text(encoding="utf-8"))
    assert cli_main(_args(tiny_dir, 40) + ["--output", str(out), "--resume"]) == 0
    assert out.read_bytes() == ref.read_bytes()


def test_output_is_created_exclusively(tiny_dir, tmp_path, capsys, keep_threads):
    link, target = tmp_path / "link.txt", tmp_path / "elsewhere.txt"
    os.symlink(target, link)  # dangling: it must not be followed
    assert cli_main(_args(tiny_dir) + ["--output", str(link)]) == 2
    assert "exists" in capsys.readouterr().err
    assert not target.exists() and not (tmp_path / "link.txt.journal").exists()
    # FILE.journal too long for the file system: no empty FILE is left to block the next run
    long = tmp_path / ("a" * 250)
    assert cli_main(_args(tiny_dir) + ["--output", str(long)]) == 2
    assert "name too long" in capsys.readouterr().err.lower()
    assert not long.exists()


def test_resume_refuses_other_gate_settings(tiny_dir, tmp_path, capsys, keep_threads):
    out = tmp_path / "out.txt"
    assert cli_main(_args(tiny_dir) + ["--output", str(out)]) == 0
    _unfinish(tmp_path / "out.txt.journal")
    for extra in (["--gate"], ["--gate-threshold", "0.5"], ["--gate-patience", "1"], ["--gate-reenable"]):
        capsys.readouterr()
        assert cli_main(_args(tiny_dir) + ["--output", str(out), "--resume"] + extra) == 2, extra
        assert "another prompt, context, model or settings" in capsys.readouterr().err
    assert cli_main(_args(tiny_dir) + ["--output", str(out), "--resume"]) == 0


def test_resume_refuses_another_server_model(tiny_dir, tmp_path_factory, tmp_path, capsys, keep_threads):
    other = make_tiny_model(str(tmp_path_factory.mktemp("tiny_other") / "other"), seed=1)
    served = Served(tiny_dir, free_port())
    args = ["generate", "--llm-url", served.url, "--slm", tiny_dir, "--prompt", PROMPT, "--context", CONTEXT,
            "--max-new-tokens", "8", "--threads", "1", "--quiet"]
    out = tmp_path / "out.txt"
    try:
        served.start()
        assert cli_main(args + ["--output", str(out)]) == 0
        _unfinish(tmp_path / "out.txt.journal")
        served.stop()
        served.model_dir = other  # the same URL now serves another model
        served.start()
        capsys.readouterr()
        assert cli_main(args + ["--output", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "was generated by" in err and "same model" in err, err
        # another URL is another key
        assert cli_main(args[:2] + [served.url.replace("127.0.0.1", "localhost")] + args[3:]
                        + ["--output", str(out), "--resume"]) == 2
        assert "another prompt" in capsys.readouterr().err
    finally:
        served.stop()
