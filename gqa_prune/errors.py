"""The one exception type for bad input: the CLI prints its message as a single line and exits 2."""


class GqaPruneError(ValueError):
    """Bad input or an impossible request, stated as one line naming the value and what is allowed."""


class SettingError(GqaPruneError):
    """A value a settings ``validate()`` refuses. ``field`` names the settings field at fault, so that the
    workflow can report the config key it came from; the message itself is what the CLI prints."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or refuse in one line naming the package and the extra that installs it."""
    import importlib

    from ._quiet import import_tokenicer_contained

    import_tokenicer_contained()  # peft and lm-eval may pull GPTQModel in, and it tokenicer
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0].replace("_", "-")
        raise GqaPruneError(
            f"{purpose} needs the optional package {package} ({error.name or module} is missing): "
            f"pip install 'gqa-prune[{extra}]'"
        ) from error
