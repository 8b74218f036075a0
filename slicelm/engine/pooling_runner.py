"""PoolingRunner: one packed encoder forward for a step of embedding / score requests.

Encoder prompts are never chunked and need no KV cache: a step concatenates whole prompts,
runs the bidirectional encoder once over them (``cu_seqlens`` marks the boundaries) and pools
one vector per request (an embedding, or a cross-encoder's scores).
"""

from __future__ import annotations

import numpy as np
import torch

from slicelm.engine.scheduler import SchedulerOutput
from slicelm.layers.pooler import apply_pooling_params


class PoolingRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.is_cross_encoder = hasattr(model, "apply_activation")

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[torch.Tensor]:
        requests = [s.request for s in sched.scheduled]
        assert all(s.num_new_tokens == s.request.num_tokens for s in sched.scheduled), "pooling prompts are whole"
        lens = np.array([r.num_tokens for r in requests], dtype=np.int64)
        cu = np.zeros(len(requests) + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        input_ids = np.concatenate([np.asarray(r.prompt_token_ids, dtype=np.int64) for r in requests])
        positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
        token_type_ids = None
        if any(r.token_type_ids is not None for r in requests):
            token_type_ids = torch.from_numpy(np.concatenate([
                np.asarray(r.token_type_ids if r.token_type_ids is not None else [0] * r.num_tokens, dtype=np.int64)
                for r in requests
            ])).to(self.device)
        cu_t = torch.from_numpy(cu).to(self.device)
        hidden = self.model(
            torch.from_numpy(input_ids).to(self.device),
            torch.from_numpy(positions).to(self.device),
            token_type_ids,
            cu_t,
            int(lens.max()),
        )
        params = [r.pooling_params for r in requests]
        if self.is_cross_encoder:
            logits = self.model.pool(hidden, cu_t)
            out = [
                logits[i] if p.use_activation is False else self.model.apply_activation(logits[i : i + 1], p.task)[0]
                for i, p in enumerate(params)
            ]
        else:
            pooled = self.model.pool(hidden, cu_t, normalize=False)
            out = apply_pooling_params(pooled, params, self.model.pooling)
        return [t.float().cpu() for t in out]
