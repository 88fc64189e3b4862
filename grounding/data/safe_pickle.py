"""Load a pickle from a stranger (the `refer` toolkit's `refs(*).p`) without running any of its code.

Plain containers, numbers and strings are built by pickle opcodes alone; everything else goes
through `find_class`, which is where a malicious pickle names `os.system`. Only `set` and
`frozenset` (which protocol 2 pickles by name) are admitted there.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from grounding.errors import UnsafePickleError

_ALLOWED = {(module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset")}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedReader, source: Path) -> None:
        # latin1 decodes Python 2 `str` objects, as the refer pickles were written by Python 2.
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refused to load: the pickle asks for {module}.{name}; only plain "
            f"containers, numbers and strings are allowed in an annotation file")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refused to load: the pickle uses persistent IDs")


def load_plain_pickle(path: str | Path) -> Any:
    """Unpickle `path`, admitting only dicts, lists, tuples, sets, numbers, strings and None.

    Bytes load from protocol 3 on; older protocols build them by calling `_codecs.encode`, refused.
    """
    path = Path(path)
    with path.open("rb") as file:
        try:
            return _RestrictedUnpickler(file, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as error:
            from grounding.errors import DatasetFormatError

            raise DatasetFormatError(f"{path}: not a readable pickle: {error}") from error
