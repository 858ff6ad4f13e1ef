"""The gateway: an OpenAI-compatible edge in front of the engine replicas.

Pure decisions (routing, circuit breaking, admission, limits, class capping) live in their own
modules and take typed state; `app` (routes), `forward` (attempt, retry, relay), `ledger`
(tenant allowance) and `replicas` are the thin I/O layer around them (ADR 0002, Layout).
"""
