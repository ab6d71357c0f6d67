"""The promotions domain: pure Python, no I/O, imports nothing of ours outside ``core``."""
