"""qtool's command line and Python API (quantize_cli.api)."""
