"""The pure filesystem core: list, hash, clone and release, with the standard library and worker.errors only.

No Celery, kombu, redis or click may be imported from here (the suite checks it), so the core can be
reasoned about, fault-swept and reused without the service around it.
"""
