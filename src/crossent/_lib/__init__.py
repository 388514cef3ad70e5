"""Private helpers shared by every crossent module."""
