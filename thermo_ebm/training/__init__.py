"""`train` (thermo_ebm.train): the loop (`loop`), the persistent sampler chains (`chains`), the objectives
(`objectives`) and the resumable state a checkpoint holds (`state`)."""
