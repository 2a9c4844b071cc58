"""--temps auto: the scan brackets the structure and the placement resolves the heat-capacity peak."""
import json

import numpy as np
import pytest
import xarray as xr

from thermo_ebm import ThermoEBMError, measure
from thermo_ebm.cli import parse_temps
from thermo_ebm.measurement.temperatures import choose, thermodynamic_positions
from thermo_ebm.testing import DoubleWells

T_PEAK = 0.2945  # DoubleWells' exact C(T) maximum (any d: a product of identical wells)


def test_auto_temperatures_resolve_the_heat_capacity_peak_of_double_wells():
    ds = measure(DoubleWells(8), "auto", ensemble="marginal", data=None, device="cpu", seed=0, auto_temps=10,
                 ais_chains=128, replicas=8, chains=32, samples=400)
    t = ds.temperature.values
    assert len(t) >= 10 and t[0] < T_PEAK < t[-1]
    assert abs(float(ds.C_peak_T) - T_PEAK) < 4 * float(ds.C_peak_T_err), (float(ds.C_peak_T), float(ds.C_peak_T_err))
    assert np.sum((t > T_PEAK / 2) & (t < 2 * T_PEAK)) >= 3  # crowded around the peak
    assert "--temps auto" in ds.attrs["temperatures_chosen"]
    scan = json.loads(ds.attrs["temperature_scan"])
    assert len(scan["temperature"]) >= 5 and parse_temps("auto") == "auto"


def test_placement_follows_the_thermodynamic_length():
    t = np.geomspace(0.1, 10, 9)
    c = np.exp(-np.log(t / 1.0) ** 2 / 0.1) * 100 + 0.01  # a sharp peak at T = 1
    scan = xr.Dataset({"info_bits": ("temperature", 10 / t), "C": ("temperature", c),
                       "flag_x": ("temperature", np.zeros(9, np.int8))}, coords={"temperature": t})
    temps, why = choose(scan, 12)
    s = thermodynamic_positions(t, c)
    assert np.all(np.diff(s) >= 0)
    assert np.sum((temps > 0.5) & (temps < 2)) > np.sum(temps <= 0.5) and "equal thermodynamic length" in why
    scan["flag_x"] = ("temperature", (t < 0.3).astype(np.int8))  # frozen below 0.3: the range starts above
    temps, why = choose(scan, 12)
    assert temps[0] > 0.3 and "freezing point" in why


def test_a_capped_data_seeded_path_is_flagged():
    """max_bridge_steps (the --temps auto scan's cap) shortens the data-seeded path below the length rule: the
    temperatures it under-anneals are flagged low ESS whatever their weights say, and the rule without a cap
    flags nothing it did not flag before."""
    from types import SimpleNamespace
    from thermo_ebm.config import MeasureConfig
    from thermo_ebm.measurement.flags import bridge_capped
    seeded = SimpleNamespace(length=np.array([[2.0, 20.0]]), steps=np.array([300]))
    capped = MeasureConfig(max_bridge_steps=300)
    assert list(bridge_capped(capped, seeded)) == [False, True]  # 8 x 2^2 = 32 <= 300 < 8 x 20^2
    assert bridge_capped(MeasureConfig(), seeded) is False
    with pytest.raises(ThermoEBMError, match="max-bridge-steps|max_bridge_steps"):
        MeasureConfig(max_bridge_steps=0).validate()


def test_a_scan_frozen_everywhere_extends_upwards_and_flagged_values_set_no_range():
    """On a nominal T_train's scale every first-scan temperature is frozen and flagged, with huge, meaningless
    information: the scan goes on upwards, and neither melting nor the range is judged from flagged values."""
    from thermo_ebm.measurement.temperatures import extend
    t = np.geomspace(0.0625, 16, 5)
    frozen = xr.Dataset({"info_bits": ("temperature", [1e7, 1e6, 1e5, 1e4, 1e3]), "C": ("temperature", np.ones(5)),
                         "flag_x": ("temperature", np.ones(5, np.int8))}, coords={"temperature": t})
    more = extend(frozen)
    assert more is not None and more.min() > 16
    t2 = np.geomspace(0.0625, 4096, 9)
    info = np.array([1e7, 1e6, 1e5, 1e4, 900.0, 700.0, 300.0, 40.0, 1.0])
    scan = xr.Dataset({"info_bits": ("temperature", info), "C": ("temperature", np.linspace(9, 1, 9)),
                       "flag_x": ("temperature", (t2 < 10).astype(np.int8))}, coords={"temperature": t2})
    temps, why = choose(scan, 8)
    assert temps.min() >= 16 and temps.max() == 4096 and "melting at T = 4.1e+03" in why, why
