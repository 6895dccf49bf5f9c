"""``python -m pacsfetch`` runs the CLI."""

from pacsfetch.cli import main

main()
