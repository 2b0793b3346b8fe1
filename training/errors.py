"""The one error type a user can cause: it prints as a single line, never a traceback."""


class UserError(Exception):
    """Something the user can fix: bad config, bad script, bad dataset, missing model.

    The message says what is wrong, where (file, line, key) and what to do.
    """
