"""Example methods kept outside the suite's packages: run them with --method examples.<module>:<name>."""
