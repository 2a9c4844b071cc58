"""`measure` (thermo_ebm.measure, defined in `run`) and its stages in order: inputs (prepare -> Problem) -> anneal
(plan, anneal per shard, pool; typed `records`) -> thermo (thermodynamics -> Thermo) -> flags (diagnose) ->
dataset (to_dataset, add_likelihood, save_measurement); `likelihood` (held-out log p_T(x), T_ML) and
`temperatures` (`--temps auto`)."""
