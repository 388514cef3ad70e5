"""Private loss implementations, one family per module; re-exported by :mod:`crossent`."""
