"""thermo-ebm: thermodynamics of energy-based models (free energy, entropy, heat capacity, information)."""
__version__ = "0.1.0"

from .errors import ThermoEBMError  # noqa: E402
from .measure import MeasureConfig, measure  # noqa: E402

__all__ = ["ThermoEBMError", "MeasureConfig", "measure", "__version__"]
