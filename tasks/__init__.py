"""Celery tasks of rootfs-worker; importing this package registers them on `worker.celery.app`."""
