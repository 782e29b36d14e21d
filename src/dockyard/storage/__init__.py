"""Storage drivers: one small interface (``driver.StorageDriver``), one module per backend."""
