"""Command-line front door (``megalong``); see :mod:`megalong.cli.main`."""
