"""The exit status of every ``vizkit`` command."""

from enum import IntEnum


class ExitCode(IntEnum):
    """As pytest's ``ExitCode``: a pipeline can act on each one differently."""

    #: Everything worked.
    OK = 0
    #: The report was written, but an image, a technique or a report hook failed.
    FAILURES = 1
    #: Bad arguments or inputs (a usage error): nothing was run and nothing written.
    USAGE_ERROR = 2
    #: vizkit itself failed: nothing (or an incomplete report) was written; the message
    #: says which, and where the traceback went.
    INTERNAL_ERROR = 3
    #: Interrupted (Ctrl-C), as shells report SIGINT: no report was written.
    INTERRUPTED = 130
