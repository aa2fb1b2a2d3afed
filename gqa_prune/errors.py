"""The one exception type for bad input: the CLI prints its message as a single line and exits 2."""


class GqaPruneError(ValueError):
    """Bad input or an impossible request, stated as one line naming the value and what is allowed."""
