"""``ralm serve``'s settings: where it listens, its token, its micro-batching and its request limits.

Kept apart from ``app`` so that ``ralm serve --help`` reads the flags without importing FastAPI or a store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ralm.errors import RalmError, refuse_below


@dataclass
class ServeConfig:
    stores: list[str] = field(default_factory=list, metadata={"help": "datastore directories or store sets to serve",
                                                              "cli": False})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback unless told otherwise)"})
    port: int = field(default=8765, metadata={"help": "TCP port to listen on"})
    token_file: str | None = field(default=None, metadata={"help": "file holding a bearer token every route but "
                                                                   "/health requires"})
    max_batch: int = field(default=64, metadata={"help": "most queries merged into one index search"})
    max_wait_ms: float = field(default=5.0, metadata={"help": "longest a query waits for others to join its "
                                                              "search (0: no waiting)"})
    max_queries: int = field(default=256, metadata={"help": "most queries in one /search request (/chunks: 16x as "
                                                            "many rows)"})
    max_k: int = field(default=1024, metadata={"help": "largest k a request may ask for"})
    max_query_bytes: int = field(default=8192, metadata={"help": "longest query text, in UTF-8 bytes"})
    max_body_bytes: int = field(default=16 * 2**20, metadata={"help": "largest request body, in bytes"})
    timeout_s: float = field(default=60.0, metadata={"help": "a request whose search takes longer gets a 504"})
    ray_address: str | None = field(default=None, metadata={"help": "a running Ray cluster (HOST:PORT) whose "
                                                                    "actors hold the shards of served store sets"})
    replicas: int = field(default=1, metadata={"help": "Ray actors per shard (with --ray-address): a dead one's "
                                                       "searches go to the next"})

    def __post_init__(self) -> None:
        refuse_below(self, ("replicas", "max_batch", "max_queries", "max_k", "max_query_bytes", "max_body_bytes"))
        if not 0 <= self.port <= 65535:
            raise RalmError(f"--port {self.port}: must be in 0..65535")
        if self.max_wait_ms < 0:
            raise RalmError(f"--max-wait-ms {self.max_wait_ms}: must be >= 0")
        if self.timeout_s <= 0:
            raise RalmError(f"--timeout-s {self.timeout_s}: must be > 0")

    def token(self) -> str | None:
        """The bearer token of ``--token-file`` (the file's text, stripped), or None without one."""
        if self.token_file is None:
            return None
        path = Path(self.token_file)
        if not path.is_file():
            raise RalmError(f"--token-file {path}: no such file")
        token = path.read_text(encoding="utf-8").strip()
        if not token or any(c.isspace() for c in token):
            raise RalmError(f"--token-file {path}: must hold one token and nothing else (no blanks)")
        return token
