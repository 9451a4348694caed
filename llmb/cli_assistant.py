"""Assistant commands (chat, merge, push). Filled in by the assistant work (issue #3)."""


def register(sub):
    pass
