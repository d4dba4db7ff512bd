"""`python -m florana` is the `florana` command."""

from florana.cli import main

main()
