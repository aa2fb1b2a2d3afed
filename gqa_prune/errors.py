"""The one exception type for bad input: the CLI prints its message as a single line and exits 2."""


class GqaPruneError(ValueError):
    """Bad input or an impossible request, stated as one line naming the value and what is allowed."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or refuse in one line naming the package and the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0].replace("_", "-")
        raise GqaPruneError(
            f"{purpose} needs the optional package {package} ({error.name or module} is missing): "
            f"pip install 'gqa-prune[{extra}]'"
        ) from error
