"""`python -m pykp`: the same CLI as the `pykp` command."""

from pykp.cli.app import app

app(prog_name="pykp")
