"""thermo-ebm: thermodynamics of energy-based models (free energy, entropy, heat capacity, information).

Public API: `train` (thermo_ebm.training.loop), `measure` and `MeasureConfig` (thermo_ebm.measurement.run),
`evaluate` and `EvalConfig` (thermo_ebm.evaluation.evaluate), `open_results` (thermo_ebm.files.results), `ThermoEBMError`
(every user mistake).
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("thermo-ebm")  # pyproject.toml's, as installed
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

from .errors import ThermoEBMError  # noqa: E402
from .evaluation.evaluate import EvalConfig, evaluate  # noqa: E402
from .files.results import open_results  # noqa: E402
from .measurement.run import MeasureConfig, measure  # noqa: E402
from .training.loop import TrainConfig, train  # noqa: E402

__all__ = ["ThermoEBMError", "MeasureConfig", "measure", "EvalConfig", "evaluate", "open_results", "TrainConfig",
           "train", "__version__"]
