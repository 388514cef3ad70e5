"""Float64 NumPy references written the obvious way (loops are fine), one module per family.

Magic constants come from mpmath; each says so in a comment.
"""
