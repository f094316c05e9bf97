"""labvm: persistent GPU desktops for a deep-learning lab."""

__version__ = "0.1.0"
