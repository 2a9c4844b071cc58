"""The one exception type for user mistakes (bad options, missing or unsafe files)."""


class ThermoEBMError(Exception):
    """A user-facing error with a one-line message; the CLI exits with code 2 on it."""


class TrainingDiverged(RuntimeError):
    """Training diverged and could not (or was told not to) recover; the CLI exits with code 1."""
