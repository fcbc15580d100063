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
    #: vizkit itself failed: no report was written (an earlier one in the folder stays as
    #: it was); the message says where the traceback went.
    INTERNAL_ERROR = 3
    #: The report could not be written (no space left, a disk quota, a read-only or
    #: failing disk): the run's work is lost, and the folder is as it was (an earlier
    #: report there unchanged). Not a usage error, not a bug: retry when there is room.
    WRITE_ERROR = 4
    #: Interrupted (Ctrl-C), as shells report SIGINT: no report was written (an earlier
    #: one in the folder stays as it was).
    INTERRUPTED = 130
