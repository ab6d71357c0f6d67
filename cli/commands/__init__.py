"""The operator CLI's command groups, one module per API area (each a typer sub-app)."""
