"""The retrieval service (``ralm serve``) and the client that makes ``--datastore http://HOST:PORT`` a store."""
