"""Native executors: backend-specific fast paths behind the array-API formula.

Each executor runs the same loss as :mod:`crossent._losses` (same options
object, same semantics, same errors) with the backend's own kernels where they
have crossent's semantics, and returns ``None`` where the generic formula must
run instead.
"""
