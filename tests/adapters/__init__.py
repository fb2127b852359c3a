"""Broker adapter tests: one shared contract (``contract.py``), one subclass per broker."""
