"""The one preset table (no torch: the launcher and the allocator read it at start-up).

preset -> (allocation rule, advantage modulation). alloc-only differs from grpo only in
allocation, so its learner side *is* grpo's.
"""

from __future__ import annotations

from typing import Literal

Preset = Literal["grpo", "dynamo", "alloc-only", "modulation-only"]
AllocationRule = Literal["uniform", "variance", "std"]  # allocator.rule may pick "std"

PRESET_TABLE: dict[Preset, tuple[AllocationRule, bool]] = {
    "grpo": ("uniform", False),
    "dynamo": ("variance", True),
    "alloc-only": ("variance", False),
    "modulation-only": ("uniform", True),
}


def allocation_rule(preset: Preset) -> AllocationRule:
    """How the allocator spreads samples over prompts under `preset`."""
    return PRESET_TABLE[preset][0]
