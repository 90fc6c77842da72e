"""The dpl command-line interface: one thin typer module per stage."""
