class UserError(Exception):
    """A problem with what the user gave us (a path, a flag, a file).

    Its message names the problem and what to do; the CLI prints it as one line and
    exits non-zero, the app shows it in the tab. Never a traceback.
    """
