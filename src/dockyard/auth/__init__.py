"""Authentication and access control: htpasswd, bearer tokens, the built-in token server."""
