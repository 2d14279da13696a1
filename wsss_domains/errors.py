"""The one error type for problems a user can fix (bad input, missing file, wrong option).

The API raises it with a message that names the file or option; the command line prints that
message as one line and exits with code 2. Anything else that escapes is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""
