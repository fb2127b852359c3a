"""The motivating scenario, end to end: enqueue document indexing from a FastAPI route, run it
in a serve_queue consumer deployment that calls another deployment, poll until done."""
