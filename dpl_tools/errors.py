"""The one exception type the CLI turns into a clean one-line error."""


class DplError(Exception):
    """A user-facing error: bad input file, missing artifact, incompatible checkpoint.

    The message must name the file (where there is one) and the problem in one line;
    the CLI prints it as ``error: <message>`` and exits with status 2, no traceback.
    """
