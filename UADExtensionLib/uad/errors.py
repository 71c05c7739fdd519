"""The one exception type a user is meant to read."""


class UserInputError(ValueError):
    """Bad input that the user can fix: the message is one line saying what is wrong and what to do.

    The command line prints it as ``uad: error: <message>`` and exits with code 2; the Slicer module shows it
    in a message box. Anything else that escapes is a bug and keeps its traceback.
    """
