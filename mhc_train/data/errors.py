"""The one exception type the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad or inconsistent data: a missing path, an empty dataset, undecodable bytes, a prepared
    directory that does not match its meta.json, a tokenizer that does not match the model.

    A ValueError subclass so callers that already catch ValueError keep working; the message always
    names the path (or setting) at fault, because "file not found" without the file is useless in a
    multi-node job log.
    """
