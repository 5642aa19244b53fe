"""The ``scribe-events`` command line (installed as ``scribe_events_cli``): a thin Typer adapter."""
