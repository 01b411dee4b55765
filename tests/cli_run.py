"""Run the CLI in-process, as a user would, and capture what it prints."""

from __future__ import annotations

from cdmbench.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `cdmbench ARGV`."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err
