"""Size choices, kept apart from the code that launches: row blocks (``blocks``) and Triton tiles, strategies and
streams (``triton``). They read the environment and the device, never the data."""
