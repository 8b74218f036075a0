"""The stack's web page, served by the router at ``/dashboard/``: each GPU with the replicas' memory slices and
their measured use, SM shares and placement policies (and the CPU's replicas), each model's replicas, states,
restarts, load and latency, and the last minutes as small charts, refreshed every few seconds from
``/dashboard/api/state``. ``slicelm top`` shows the same state in a terminal. HTTP only: no torch, no engine."""
