"""Errors raised on bad evaluation input. Each message names the file and, where there is one, the field."""

from __future__ import annotations


class GroundingError(Exception):
    """Base class of every error `grounding` raises on bad input."""


class DatasetFormatError(GroundingError, ValueError):
    """A dataset file is missing, of the wrong format, or lacks a field."""


class SplitNotFoundError(GroundingError, ValueError):
    """The requested split does not exist in the dataset on disk."""


class UnsafePickleError(GroundingError, ValueError):
    """A pickle tried to build something other than plain containers, numbers and strings."""


class PromptStyleError(GroundingError, ValueError):
    """An unknown or inconsistent prompt style."""


class RunConfigError(GroundingError, ValueError):
    """An output directory holds a run made with a different configuration."""
