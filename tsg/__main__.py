"""`python -m tsg`: the same as the `tsg` command."""

from tsg.cli import main

main()
