"""`python -m hyperfields` (and `torchrun -m hyperfields`) runs the command line."""

from hyperfields.cli.main import main

main()
