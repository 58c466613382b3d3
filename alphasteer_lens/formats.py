"""Prompt formats: how a prompt becomes the text a model reads.

Three kinds, because the format changes the activations (and so every direction and fit):

- ``chat``: the tokenizer's chat template (optional system prompt), ready for the assistant's
  reply, plus an optional assistant prefix (SCANS uses " Sure");
- ``template``: a user template with one ``{prompt}`` slot (filled by substitution, never
  ``str.format``), or a callable ``prompt -> text``;
- ``raw``: the prompt as it is, for base models; a BOS token is prepended as TransformerLens does
  (``cfg.default_prepend_bos``) unless ``bos`` says otherwise.

The default is the chat template when the tokenizer has one and raw text otherwise. The format is
recorded with every artifact and activation cache (:meth:`PromptFormat.to_json`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

FormatKind = Literal["chat", "template", "raw"]
_KINDS = ("chat", "template", "raw")


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered; see the module docstring. ``bos`` (template and raw kinds):
    prepend the tokenizer's BOS token; None follows the model's ``cfg.default_prepend_bos``."""

    kind: FormatKind = "chat"
    system: str | None = None
    assistant_prefix: str = ""
    template: str | Callable[[str], str] | None = None
    bos: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"prompt format kind must be one of {list(_KINDS)}, got {self.kind!r}")
        if self.kind == "template":
            t = self.template
            if isinstance(t, str):
                if t.count("{prompt}") != 1:
                    raise ValueError(
                        f"a prompt template needs exactly one '{{prompt}}' slot, got {t[:80]!r}"
                    )
            elif not callable(t):
                raise ValueError("a 'template' prompt format needs template='...{prompt}...'")
        elif self.template is not None:
            raise ValueError(f"template= is only for kind='template', not {self.kind!r}")
        if self.system is not None and self.kind != "chat":
            raise ValueError("a system prompt needs the chat kind (the template holds no slot)")
        for name in ("system", "assistant_prefix"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"prompt format {name} must be a string, got {value!r}")

    @classmethod
    def chat(cls, system: str | None = None, assistant_prefix: str = "") -> PromptFormat:
        return cls("chat", system=system, assistant_prefix=assistant_prefix)

    @classmethod
    def raw(cls, *, bos: bool | None = None, assistant_prefix: str = "") -> PromptFormat:
        return cls("raw", assistant_prefix=assistant_prefix, bos=bos)

    @classmethod
    def user_template(
        cls, template: str | Callable[[str], str], *, bos: bool | None = None
    ) -> PromptFormat:
        return cls("template", template=template, bos=bos)

    @classmethod
    def parse(cls, spec: str) -> PromptFormat:
        """From a command-line value: ``chat``, ``raw``, or a template containing ``{prompt}``."""
        if spec in ("chat", "raw"):
            return cls(spec)  # type: ignore[arg-type]
        if "{prompt}" in spec:
            return cls("template", template=spec)
        raise ValueError(
            "--prompt-format must be 'chat', 'raw' or a template with one '{prompt}', "
            f"got {spec!r}"
        )

    def with_prefix(self, assistant_prefix: str) -> PromptFormat:
        """The same format with another assistant prefix (SCANS' " Sure")."""
        return PromptFormat(self.kind, self.system, assistant_prefix, self.template, self.bos)

    def render(self, tokenizer: Any, prompt: str) -> str:
        """The text the model reads for ``prompt`` (without a prepended BOS)."""
        if self.kind == "raw":
            return prompt + self.assistant_prefix
        if self.kind == "template":
            t = self.template
            text = t.replace("{prompt}", prompt) if isinstance(t, str) else t(prompt)  # type: ignore[misc]
            if not isinstance(text, str):
                raise ValueError(
                    f"prompt template callable returned {type(text).__name__}, not str"
                )
            return text + self.assistant_prefix
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template: use PromptFormat.raw() (or "
                "--prompt-format raw) for a base model, or "
                "PromptFormat.user_template('...{prompt}...')"
            )
        messages = [{"role": "user", "content": prompt}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text) + self.assistant_prefix

    def prepends_bos(self, model_cfg: Any) -> bool:
        """Whether a BOS token goes before the rendered text (never for chat: the template holds
        its own special tokens)."""
        if self.kind == "chat":
            return False
        if self.bos is not None:
            return self.bos
        return bool(getattr(model_cfg, "default_prepend_bos", True))

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe record (a callable template is recorded by name and cannot be reloaded)."""
        t = self.template
        if t is not None and not isinstance(t, str):
            t = f"<callable {getattr(t, '__qualname__', type(t).__name__)}>"
        return {
            "kind": self.kind,
            "system": self.system,
            "assistant_prefix": self.assistant_prefix,
            "template": t,
            "bos": self.bos,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PromptFormat:
        """Inverse of :meth:`to_json`, validating every field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"prompt format must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"kind", "system", "assistant_prefix", "template", "bos"}
        if unknown:
            raise ValueError(f"prompt format has unknown fields {sorted(unknown)}")
        template = data.get("template")
        if isinstance(template, str) and template.startswith("<callable "):
            raise ValueError(f"prompt format template {template} was a callable; pass it again")
        bos = data.get("bos")
        if bos is not None and not isinstance(bos, bool):
            raise ValueError(f"prompt format bos must be true, false or null, got {bos!r}")
        return cls(
            kind=data.get("kind", "chat"),
            system=data.get("system"),
            assistant_prefix=data.get("assistant_prefix", "") or "",
            template=template,
            bos=bos,
        )


def default_format(tokenizer: Any) -> PromptFormat:
    """The chat template when the tokenizer has one, raw text otherwise."""
    return PromptFormat.chat() if getattr(tokenizer, "chat_template", None) else PromptFormat.raw()


def resolve_format(
    tokenizer: Any,
    prompt_format: PromptFormat | str | None = None,
    *,
    system: str | None = None,
    assistant_prefix: str = "",
) -> PromptFormat:
    """The format to use: ``prompt_format`` (a :class:`PromptFormat` or a ``--prompt-format``
    string) or :func:`default_format`, with the older ``system=`` / ``assistant_prefix=``
    keywords folded in."""
    if isinstance(prompt_format, str):
        prompt_format = PromptFormat.parse(prompt_format)
    fmt = prompt_format if prompt_format is not None else default_format(tokenizer)
    if system is not None:
        if fmt.kind != "chat":
            raise ValueError(f"system= needs the chat prompt format, not {fmt.kind!r}")
        fmt = PromptFormat("chat", system, fmt.assistant_prefix, None, fmt.bos)
    if assistant_prefix:
        fmt = fmt.with_prefix(fmt.assistant_prefix + assistant_prefix)
    return fmt
