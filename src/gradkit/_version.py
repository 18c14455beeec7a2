"""The version of gradkit, in one place: the package and the build (pyproject.toml) both read it."""

__version__ = "0.1.0"
