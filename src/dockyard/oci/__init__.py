"""Pure OCI rules: digests, names, media types and manifest validation. No I/O here."""
