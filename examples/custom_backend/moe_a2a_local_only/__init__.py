"""Example moe-a2a backend package: the ``local_only`` dispatcher (see dispatch.py)."""
