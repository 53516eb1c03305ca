"""The base class of input-data errors: their message names the file, field or sample at fault."""


class DataError(ValueError):
    """Bad annotations, videos, settings or dataset directory; entry points print the message alone."""
