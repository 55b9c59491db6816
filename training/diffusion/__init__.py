"""Diffusion: noise schedules and losses as pure functions, and the reference sampler."""
