"""Hook-point names: templates with one ``{layer}`` slot, filled by substitution, never ``format``.

A template is untrusted when it comes from an artifact, so it is checked against a fixed shape,
``blocks.{layer}.<suffix>`` with a known suffix, and filled with ``str.replace``: a format spec
such as ``{layer:>300000000}`` or a constant layer cannot slip through.
"""

from __future__ import annotations

import re

RESID_PRE = "blocks.{layer}.hook_resid_pre"
RESID_MID = "blocks.{layer}.hook_resid_mid"
RESID_POST = "blocks.{layer}.hook_resid_post"
SUFFIXES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)
_TEMPLATE = re.compile(r"blocks\.\{layer\}\.(" + "|".join(SUFFIXES) + r")")
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def check_template(template: object) -> str:
    """``template`` if it is ``blocks.{layer}.<suffix>`` with a known suffix; else a ValueError
    naming it."""
    if not isinstance(template, str) or _TEMPLATE.fullmatch(template) is None:
        shown = repr(template)[:80]
        raise ValueError(
            f"hook template {shown} is not allowed: expected 'blocks.{{layer}}.<suffix>' with "
            f"exactly one '{{layer}}' and a suffix in {list(SUFFIXES)}"
        )
    return template


def hook_name(template: str, layer: int) -> str:
    """The hook name for ``layer``: ``check_template(template)`` with ``{layer}`` replaced."""
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {layer!r}")
    return check_template(template).replace("{layer}", str(layer))


def layer_of(name: str) -> int:
    """The block index in a hook name such as ``blocks.12.hook_resid_pre``."""
    m = _LAYER.match(name)
    if m is None:
        raise ValueError(f"hook {name!r} is not inside a block (expected 'blocks.L....')")
    return int(m.group(1))
