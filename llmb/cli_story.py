"""Story model commands (sample, eval, lr-find)."""


def register(sub):
    pass
