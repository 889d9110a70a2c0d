"""``python -m side_extract ...`` (and ``accelerate launch -m side_extract ...``, ``torchrun -m -- side_extract ...``):
the ``side`` command."""
from side_extract.cli.main import app

if __name__ == "__main__":
    app(prog_name="side")
