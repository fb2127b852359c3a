"""serve_queue: an asyncio-native, Celery-compatible task consumer for Ray Serve."""
