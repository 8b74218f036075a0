"""Mixture-of-experts: router top-k (``router.py``), the expert layer with its torch path (``layer.py``)
and the fused Triton path: token→expert alignment (``align.py``) and the expert GEMMs (``fused_moe.py``)."""
