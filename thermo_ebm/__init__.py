"""thermo-ebm: thermodynamics of energy-based models (free energy, entropy, heat capacity, information).

Public API: `train` (thermo_ebm.training), `measure` and `MeasureConfig` (thermo_ebm.measurement),
`evaluate` and `EvalConfig` (thermo_ebm.evaluation), `open_results` (thermo_ebm.results), `ThermoEBMError`
(every user mistake).
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("thermo-ebm")  # pyproject.toml's, as installed
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

from .errors import ThermoEBMError  # noqa: E402
from .evaluation import EvalConfig, evaluate  # noqa: E402
from .measurement import MeasureConfig, measure  # noqa: E402
from .results import open_results  # noqa: E402
from .training import TrainConfig, train  # noqa: E402

__all__ = ["ThermoEBMError", "MeasureConfig", "measure", "EvalConfig", "evaluate", "open_results", "TrainConfig",
           "train", "__version__"]
