"""Per-sample results as JSONL, appended batch by batch so that a killed run loses at most one batch.

A run directory holds `samples.jsonl` (or one `samples.shard{r}of{n}.jsonl` per shard while
sharded), `config.json`, and, once every sample has a record, `summary.json` and `metrics.csv`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from grounding.errors import GroundingError

MERGED = "samples.jsonl"


def kept_mask(kept: Iterable[int], count: int) -> str:
    """The visual tokens a row kept, out of `count`, as hex: bit i of the number is token i (raster order).

    A record carries it in `visual_kept` (144 characters for LLaVA-1.5's 576 tokens), so an analysis of
    what pruning kept reads finished runs and needs no rerun. The order the tokens were fed in is not kept:
    the run's position policy gives it.
    """
    number = 0
    for index in kept:
        if not 0 <= int(index) < count:
            raise ValueError(f"kept token {int(index)} is outside 0..{count - 1}")
        number |= 1 << int(index)
    return format(number, f"0{max(1, -(-count // 4))}x")


def kept_indices(mask: str, count: int) -> list[int]:
    """`kept_mask`'s inverse: the kept token indices, ascending."""
    number = int(mask, 16)
    if number >> count:
        raise ValueError(f"kept mask {mask!r} names tokens beyond the row's {count}")
    return [index for index in range(count) if number >> index & 1]


def shard_file(out: Path, rank: int, world: int) -> Path:
    return out / (MERGED if world == 1 else f"samples.shard{rank}of{world}.jsonl")


def record_files(out: Path) -> list[Path]:
    return sorted(out.glob("samples*.jsonl"))


def repair_torn_tail(path: Path) -> int:
    """Drop a last line cut short by a kill; return how many bytes were dropped."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as file:
        file.truncate(keep)
    return len(data) - keep


def read_records(paths: Iterable[Path]) -> dict[int, dict]:
    """index -> record over all `paths`; a torn last line (a killed writer) is skipped."""
    records: dict[int, dict] = {}
    for path in paths:
        lines = path.read_text().split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the unterminated last line of a killed writer
                    continue
                raise GroundingError(f"{path}:{number}: not a JSON record; the file was edited or corrupted") from None
            records.setdefault(record["index"], record)
    return records


def scored_records(out: Path) -> dict[int, dict]:
    """A run directory's records (every shard's) of the samples that were scored: those without an `error`."""
    return {index: record for index, record in read_records(record_files(out)).items() if record.get("error") is None}


def append_records(path: Path, records: Iterable[dict]) -> None:
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    with path.open("a", encoding="utf-8") as file:
        file.write(lines)
        file.flush()


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_merged(out: Path, records: dict[int, dict]) -> Path:
    """All records, ordered by sample index, into `samples.jsonl` (shard files are left as they are)."""
    text = "".join(json.dumps(records[index], ensure_ascii=False) + "\n" for index in sorted(records))
    write_atomic(out / MERGED, text)
    return out / MERGED


@contextmanager
def claim(path: Path) -> Iterator[bool]:
    """Whether this process may do a once-only job (fit the probes, draw a sweep's figure): False while
    another process holds `path`'s claim.

    Shards finishing at once each see every record there; the claim keeps two of them from doing the same
    job side by side. It is an OS lock, so a killed holder leaves none behind.
    """
    with path.open("a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
