"""ralm: retrieval-augmented language models on one datastore."""

from ralm.datastore.store import Datastore, Hit
from ralm.errors import IncompatibleError, RalmError, StoreError

__all__ = ["Datastore", "Hit", "RalmError", "StoreError", "IncompatibleError"]
__version__ = "0.1.0"
