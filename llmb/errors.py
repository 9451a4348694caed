class UserError(Exception):
    """A problem with what the user gave us (a path, a flag, a file).

    Its message names the problem and what to do; the CLI prints it as one line and
    exits non-zero, the app shows it in the tab. Never a traceback.
    """


def clip(value, most=40):
    """`value` as text for a message, cut to `most` characters with "…": a 400-digit number or a 300-character
    name is named, not echoed whole."""
    text = str(value)
    return text if len(text) <= most else text[:most - 1] + "…"
