"""Samplers over a small state with an explicit torch.Generator: the MCMC kernels (`kernels`, counter-based noise
in `rng`) and what `measure` builds from them: AIS from uniform (`ais`), the data-seeded bridge (`bridge`, base
mixtures in `gaussians`), tempered SMC (`smc`) and the replica-exchange sweep (`sweep`)."""
