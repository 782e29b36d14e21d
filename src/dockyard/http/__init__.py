"""What the HTTP layer (``dockyard.api``) and the auth middleware (``dockyard.auth``) share, below
both: the handler type, the one rendering of errors and JSON bodies with the headers every
response carries (``responses``), and what is known of a request before any handler runs: the
caller's address and the URLs the client sees (``request``).

It imports neither ``api`` nor ``auth`` (tests/unit/test_import_graph.py holds it to that), so
auth can stay a middleware under the handlers instead of reaching up into them."""
