"""Tensor parallelism: the ranks' process group and its collectives (``parallel_state``), the env every
rank runs with (``env``). Below ``layers`` in the import order: layers and models ask for the group."""
