"""The ``attnseg`` command line."""
