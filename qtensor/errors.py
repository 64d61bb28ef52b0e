"""The error types users see: a one-line message, exit code 2 (bad input) or 1 (eval gate failed)."""


class QtoolError(Exception):
    """Bad input or an unsupported request. The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class GateFailed(Exception):
    """`qtool eval` thresholds crossed: exit code 1, the failed conditions named."""

    exit_code = 1

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result or {}
