"""Benchmarks of serve_queue against Celery and Ray Serve's task consumer (not tests).

Run the whole comparison with ``python -m benchmarks.run`` (``--quick`` for a one-minute smoke
run); see ``benchmarks/run.py``.
"""
