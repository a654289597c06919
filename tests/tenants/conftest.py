"""Both store backends (disk directory, Redis namespace on the shared Redis), as in tests/prefix_store."""
from tests.prefix_store.conftest import backend, namespace, redis_server, store, stores  # noqa: F401  (fixtures)
