"""(not implemented yet)"""

from dpl_tools.errors import DplError


def command() -> None:
    raise DplError("this command is not implemented yet")
