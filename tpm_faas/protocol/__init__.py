"""The wire: everything that crosses a process boundary, torch-free.

- :mod:`.requests`: what a user may send to each mode (pydantic, unknown fields rejected);
- :mod:`.codec`: the one tensor codec (declared dtype and shape, raw bytes in base64; numpy);
- :mod:`.replies`: typed replies (output, usage, receipt) the client reads;
- :mod:`.shard`: the typed messages the gateway sends a shard group's rank 0.
"""
