"""The error of the data modules: bad or missing data, with a message that says how to fix it."""


class DataError(ValueError):
    """Bad or missing data; the message names the file and what to do."""
