"""The Celery/Redis side around the core: settings, queues, heartbeats, transport, retries, lifecycle."""
