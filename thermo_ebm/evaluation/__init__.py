"""`evaluate` (thermo_ebm.evaluate, defined in `evaluate`): a trained model judged as JEM users do; `sample`:
samples at a temperature for `thermo-ebm sample`."""
