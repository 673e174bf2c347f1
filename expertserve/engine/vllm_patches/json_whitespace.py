"""JSON whitespace under a grammar, in the style the experts were trained on.

vLLM's `disable_any_whitespace` (needed: with free whitespace small models pad with spaces until max_tokens)
compiles xgrammar 0.2.8 JSON with a mixed style, `{"a":"b", "c":1}` (the colon without its space, the comma with
one; mlc-ai/xgrammar#945). A model trained on JSON as most data writes it (`json.dumps`: `{"a": "b", "c": 1}`) is
then forced off its own tokens at every key: the shipped JSON expert scored 65% exact under that grammar and 98%
without a grammar on its validation split. EXPERTSERVE_JSON_WHITESPACE (set from `engine.json_whitespace`) chooses
the style JSON and JSON-schema constraints compile with.

Remove when: vLLM exposes the separators xgrammar compiles JSON with (then `engine/args.py` sets them directly).
"""

from __future__ import annotations

from expertserve.engine.vllm_patches.guard import verified

VERIFIED = ("0.32.0",)
JSON_WHITESPACE_ENV = "EXPERTSERVE_JSON_WHITESPACE"
# xgrammar's compile_json_schema keywords per `engine.json_whitespace` style (config.py documents the styles);
# "vllm" keeps vLLM's own keywords.
JSON_WHITESPACE: dict[str, dict[str, object]] = {
    "spaced": {"any_whitespace": False, "separators": (", ", ": ")},
    "bounded": {"any_whitespace": True, "separators": None, "max_whitespace_cnt": 1},
    "vllm": {},
}


class _JsonStyleCompiler:
    """xgrammar's GrammarCompiler with JSON compiled in one whitespace style; everything else passes through."""

    def __init__(self, compiler, style: dict[str, object]) -> None:  # noqa: ANN001 (xgrammar's type)
        self._compiler = compiler
        self._style = style

    def compile_json_schema(self, schema, **kwargs):  # noqa: ANN001, ANN003, ANN201
        return self._compiler.compile_json_schema(schema, **{**kwargs, **self._style})

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._compiler, name)


def _patch_json_whitespace(name: str) -> None:
    style = JSON_WHITESPACE.get(name)
    if style is None:
        raise ValueError(f"{JSON_WHITESPACE_ENV}={name!r}: expected one of {sorted(JSON_WHITESPACE)}")
    if not style:
        return
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

    if getattr(XgrammarBackend.__post_init__, "_expertserve", False):
        return
    original = XgrammarBackend.__post_init__

    def post_init(self) -> None:  # noqa: ANN001
        original(self)
        self.compiler = _JsonStyleCompiler(self.compiler, style)

    post_init._expertserve = True  # type: ignore[attr-defined]
    XgrammarBackend.__post_init__ = post_init


def apply(name: str) -> None:
    """Installs the style `name` (once) after checking the installed vLLM."""
    verified("json_whitespace", VERIFIED)
    _patch_json_whitespace(name)
