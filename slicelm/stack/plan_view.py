"""The ``slicelm plan`` table."""

from __future__ import annotations

from typing import Any

from slicelm.stack.planning import StackPlan


def plan_table(plan: StackPlan) -> Any:
    from rich.table import Table

    t = Table(title="slicelm plan")
    for col in ("model", "replica", "device", "GPU uuid", "memory", "cores", "score", "weights"):
        t.add_column(col)
    for p in plan.placements:
        w = plan.weights.get(p.model)
        weights = w.describe() if w else "-"
        if not p.gpus:
            t.add_row(p.model, str(p.replica), "cpu", "-", "-", "-", "-", weights)
            continue
        for g in p.gpus:
            t.add_row(p.model, str(p.replica), f"gpu {g.index}", g.uuid, f"{g.memory_mib} MiB",
                      f"{g.cores}%" if g.cores else "-", f"{p.score:.2f}" if p.score is not None else "-", weights)
    for u in plan.unplaced:
        t.add_row(u["model"], str(u["replica"]), "[red]unplaced[/]", "; ".join(u["reasons"]), "", "", "", "")
    return t
