"""Which SimpleTuner sd3fit runs on: the version gate every patch calls before it changes anything."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from sd3fit.errors import UserError
from sd3fit.schema import SIMPLETUNER_VERSION


def installed_version() -> str | None:
    try:
        return version("simpletuner")
    except PackageNotFoundError:
        return None


def require(checked_against: str = SIMPLETUNER_VERSION, what: str = "sd3fit") -> None:
    """Stop with one line when the installed SimpleTuner is not the release `what` was checked against."""
    found = installed_version()
    if found is None:
        raise UserError("simpletuner is not installed; run ./scripts/setup.sh to install the locked environment")
    if found != checked_against:
        raise UserError(
            f"{what} was written for simpletuner {checked_against} but {found} is installed; "
            "run ./scripts/setup.sh to restore the locked version (or re-check the patches against the new one)"
        )


def wrap_once(cls, name: str, wrap, marker: str, patch: str) -> None:
    """Replace `cls.name` by `wrap(cls.name)` unless a wrapper carrying `marker` is already there (a patch applied
    twice in one process); a method that is gone means upstream changed, and the patch must be updated."""
    method = getattr(cls, name, None)
    if not callable(method):
        raise RuntimeError(f"{patch}: SimpleTuner's {cls.__name__} lacks {name}; this patch needs updating")
    if not getattr(method, marker, False):
        wrapped = wrap(method)
        setattr(wrapped, marker, True)
        setattr(cls, name, wrapped)
