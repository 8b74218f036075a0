"""``slicelm router``: one OpenAI endpoint in front of many replicas of many models (HTTP only: no torch, no engine).

production-stack's router flags, metrics and log line; our additions: timeouts, health-based ejection, failover
before streaming starts, a per-model FIFO queue with priority and a bound.
"""
