"""GPU slices: what a replica may use of a GPU, where it goes, and how it is enforced.

Plain Python (no torch, no engine): ``spec`` (the Slice a replica gets), ``hami_env`` (HAMi-core's
container env), ``inventory`` (GPUs from NVML or a HAMi node-register file), ``hami_policy`` and
``placement`` (HAMi's device scoring and Fit), ``mps`` (an MPS control daemon per GPU).
"""
