"""misalign: corrupt the visual tokens' position IDs while keeping every token (no information lost).

    from misalign import make_corruption
    corruption = make_corruption("permuted").at(0.5, num_visual=576, seed=0)
"""

from misalign.corruptions import (
    CORRUPTIONS,
    Corruption,
    Misalignment,
    corruption_spec,
    make_corruption,
    parse_corruption,
    register_corruption,
)

__all__ = ["CORRUPTIONS", "Corruption", "Misalignment", "corruption_spec", "make_corruption", "parse_corruption",
           "register_corruption"]
