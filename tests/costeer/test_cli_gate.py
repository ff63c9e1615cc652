"""`costeer generate --gate`: the confidence gate from the command line."""
from costeer.cli import main as cli_main


def test_cli_gate(smol, capsys):
    rc = cli_main(["generate", "--prompt", "Name a fruit.", "--context", "I love yellow things.",
                   "--max-new-tokens", "6", "--gate", "--gate-threshold", "0.0", "--gate-patience", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "confidence gate (0.0, patience 1): 0 of" in err  # always confident: nothing steered
    assert cli_main(["generate", "--prompt", "hi", "--context", "x", "--gate", "--gate-threshold", "1.5"]) == 2
    assert "threshold must be a number in [0, 1]" in capsys.readouterr().err
    assert cli_main(["generate", "--prompt", "hi", "--context", "x", "--gate", "--gate-patience", "0"]) == 2
    assert "patience must be an int >= 1" in capsys.readouterr().err
