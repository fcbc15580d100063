"""``python -m vizkit``: the same as the ``vizkit`` command."""

from vizkit.cli import main

main(prog_name="vizkit")
