"""The stages `measure` (thermo_ebm.measurement) runs, in order: inputs (prepare -> Problem) -> anneal (plan,
anneal per shard, pool) -> thermo (thermodynamics -> Thermo) -> flags (diagnose) -> dataset (to_dataset,
add_likelihood, save_measurement)."""
