"""What a prompt asks for, read from its form: prose (an explanation, an opinion, a comparison) or an artifact (code,
a query, structured data), and whether a conversation's last turn is a fragment that continues the previous one.
Pure Python.

The router's semantic signal says what a prompt is *about*; these cues say what it *wants*. A question about SQL
that wants prose belongs to the base model even though it is about SQL; a terse request with a pasted table
`logs(id, created_at, msg)` wants a query even though it reads unlike the expert's examples. The cues are generic
(no expert is named here): experts stay plain manifests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from expertserve.routing.lexical import FuzzyIndex, normalise

_PROSE_START = re.compile(
    r"^(?:(?:hi|hello|hey)[,.!]?\s+)?"  # thanks and approval are read past before (_ACKNOWLEDGEMENT)
    r"(?:what(?:'s| is| are| does| do)?|whats|wat|wht|why|how (?:does|do|is|are|can|should|would)|"
    r"when (?:should|do|is)|"
    r"is|are|should|would|could you explain|can you explain|explain|describe|tell me (?:about|why|how)|compare|"
    r"which is better|any (?:tips|advice|ideas|recommendations|suggestions))\b"
)
# Asking for writing that is prose however it is phrased ("write a haiku", "draft an email to my landlord"):
# the imperative that usually asks for an artifact does not count then.
_PROSE_WRITING = re.compile(
    r"^(?:(?:please|pls|can you|could you)\s+)?(?:write|compose|draft|give me|make|create|come up with|suggest)\s+"
    r"(?:me\s+)?(?:[\w-]+\s+){0,3}?(?:haiku|poem|story|stories|essay|letter|e-?mail|song|lyrics|joke|speech|limerick|"
    r"tweet|blog post|toast|slogan|tagline|name ideas|names|summary|bio|cover letter|apology|thank you note|"
    r"tips|advice|ideas|reasons|arguments|suggestions)s?\b"
)
_PROSE_OTHER_START = re.compile(
    r"^(?:(?:please|pls)\s+)?(?:summari[sz]e|translate|proofread|rephrase|paraphrase)\b"
)
_PROSE_PHRASES = (
    "difference between",
    "pros and cons",
    "history of",
    "conceptually",
    "in plain words",
    "not code",
    "no code",
    "in your opinion",
    "worth learning",
    "better than",
    "used for",
    "why is",
    "why would",
    "advantages of",
    "not examples",
    "no examples",
    "no queries",
    "without code",
    "just explain",
    "in plain english",
)
# A pasted table `name(col, col, ...)`, a schema, a JSON object or a function signature: material to work on.
_ARTIFACT_PATTERNS = (
    re.compile(r"\b\w+\s*\(\s*\w+(?:\s+\w+)?(?:\s*,\s*\w+(?:\s+\w+)?)+\s*\)"),
    re.compile(r"\bcreate table\b"),
    re.compile(r"\{\s*\"?\w+\"?\s*[:,}]"),
    re.compile(r"\binterface \w+|\btype \w+\s*=|=>|\w+\s*:\s*(?:string|number|boolean)\b"),
)
_ARTIFACT_START = re.compile(
    r"^(?:(?:hi|hey|hello|ok|okay|please|pls|plz|so)[,.!]?\s+)?"
    r"(?:write|give me (?:the|a|an)|make|create|implement|code|build|generate|turn|convert|parse|extract|pull out|"
    r"produce|list|delete|insert|update|count|find|show|get|need|return|select|structure|sum|"
    r"remove|drop|rank|calculate|compute|fetch|retrieve|filter|jsonify|put|represent|seriali[sz]e|format|"
    r"type (?:the|a|an)|"
    r"sql|json|ts|typescript|sqlite|postgres(?:ql)?|mysql|regex)\b"
)
# Asking for a thing to be produced, anywhere in the prompt.
_ARTIFACT_PHRASES = (
    "give me a",
    "give me the",
    "as json",
    "into json",
    "to json",
    "json object",
    "structured object",
    "the query",
    "a query",
    "write a function",
    "a function that",
    "->",
    "as an object",
    "an object with",
    "with keys",
    "with fields",
    "with the fields",
    "structured data",
    "machine-readable",
    "machine readable",
    "key/value",
    "key-value",
)


def _phrase(text: str) -> re.Pattern[str]:
    """`text` as a whole phrase: "give me a" is not in "give me arguments"."""
    head = r"(?<!\w)" if text[:1].isalnum() else ""
    tail = r"(?!\w)" if text[-1:].isalnum() else ""
    return re.compile(head + re.escape(text) + tail)


_PROSE_PHRASE_PATTERNS = tuple((p, _phrase(p)) for p in _PROSE_PHRASES)
_ARTIFACT_PHRASE_PATTERNS = tuple((p, _phrase(p)) for p in _ARTIFACT_PHRASES)
_FOLLOW_UP_START = re.compile(
    r"^(?:now|and|same|then|next|again|also for|what about|do the same|same for|ok now)\b"
)
_QUESTION_START = re.compile(r"^(?:what|why|how|when|where|who|which|is|are|can|could|should|do|does|tell)\b")
_TOPIC_SWITCH = re.compile(
    r"\b(?:btw|by the way|unrelated|different question|new question|off topic|change of topic)\b"
)
# Thanks and approval before the turn's real content.
_ACKNOWLEDGEMENT = re.compile(
    r"^(?:(?:(?:thanks|thank you)(?:\s+(?:a lot|so much|very much))?|thx|ty|great|perfect|nice|cool|awesome|ok|"
    r"okay|got it|lovely|excellent|brilliant)\b[\s,.!;:]*)+"
)
FRAGMENT_WORDS = 12
# An elliptical question this short ("biggest spender last year?") leans on the turns before it.
ELLIPTICAL_WORDS = 6
# Programming and query languages a prompt may name. An expert whose own profile names none of the languages a
# prompt names is the wrong one for it ("write a PHP function" is not for a TypeScript or SQL expert).
LANGUAGES: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern)
    for name, pattern in {
        "python": r"\bpython\b",
        "java": r"\bjava\b(?!script)",
        "c": r"\b(?:in c|c function|c program|c code)\b",
        "c++": r"c\+\+|\bcpp\b",
        "c#": r"c#|\bcsharp\b",
        "go": r"\bgolang\b|\bin go\b|\bgo (?:struct|function|program|code)\b",
        "rust": r"\brust\b",
        "ruby": r"\bruby\b",
        "php": r"\bphp\b",
        "kotlin": r"\bkotlin\b",
        "swift": r"\bswift\b",
        "scala": r"\bscala\b",
        "perl": r"\bperl\b",
        "shell": r"\bbash\b|\bshell script\b|\bzsh\b|\bpowershell\b",
        "javascript": r"\bjavascript\b|\bjs\b",
        "typescript": r"\btypescript\b|\bts\b",
        "sql": r"\bsql\b|\bsqlite\b|\bpostgres(?:ql)?\b|\bmysql\b",
        "haskell": r"\bhaskell\b",
        "lua": r"\blua\b",
        "dart": r"\bdart\b",
        "elixir": r"\belixir\b",
    }.items()
}


@dataclass(frozen=True)
class Cues:
    """The cues found in one prompt (each a short label, for explanations)."""

    prose: tuple[str, ...]
    artifact: tuple[str, ...]

    @property
    def wants_prose(self) -> bool:
        """Prose cues and no artifact cue."""
        return bool(self.prose) and not self.artifact


# The opening verbs the cues read, for mending a slip in them (`wirte a qurey`); five letters or more.
_START_VERBS = FuzzyIndex(
    {
        "verb": [
            "write", "create", "implement", "build", "generate", "convert", "parse", "extract", "produce", "delete",
            "insert", "update", "select", "structure", "remove", "calculate", "compute", "fetch", "retrieve",
            "filter", "explain", "describe", "compare", "translate", "summarize", "summarise",
        ]
    }
)  # fmt: skip
_POLITE = frozenset(
    {"please", "pls", "plz", "so"}
)  # "ok" and the like are read past before (_ACKNOWLEDGEMENT)


def _mend_start(text: str) -> str:
    """`text` with a slip in its opening verb mended (after a `please`)."""
    words = text.split(" ")
    at = 1 if len(words) > 1 and words[0].strip(",.!") in _POLITE else 0
    slips = _START_VERBS.hits(words[at]).get("verb")
    if slips:
        words[at] = slips[0].split("~")[1]
    return " ".join(words)


def cues(prompt: str) -> Cues:
    """The prose and artifact cues of a prompt."""
    text = _mend_start(_ACKNOWLEDGEMENT.sub("", normalise(prompt)))
    prose = [f"starts like a question ({m.group(0)!r})" for m in [_PROSE_START.match(text)] if m]
    writing = _PROSE_WRITING.match(text)
    prose += [f"asks for prose ({writing.group(0)!r})"] if writing else []
    prose += [f"asks to {m.group(0).split()[-1]!r}" for m in [_PROSE_OTHER_START.match(text)] if m]
    prose += [f"{p!r}" for p, pattern in _PROSE_PHRASE_PATTERNS if pattern.search(text)]
    artifact = [
        f"asks to {m.group(0).split()[-1]!r}" for m in [_ARTIFACT_START.match(text)] if m and not writing
    ]
    artifact += [f"contains {p.pattern[:24]!r}..." for p in _ARTIFACT_PATTERNS if p.search(text)]
    artifact += [f"{p!r}" for p, pattern in _ARTIFACT_PHRASE_PATTERNS if pattern.search(text)]
    return Cues(tuple(prose), tuple(artifact))


def is_fragment(prompt: str) -> bool:
    """A short last turn that reads as a continuation (`now for ...`, `and one that ...`, `authors with more than
    three books`, `biggest spender last year?`), not a new self-contained question or a change of topic."""
    text = _ACKNOWLEDGEMENT.sub("", normalise(prompt))  # `thanks! what's ...` is the question after it
    words = text.split()
    if not words or len(words) > FRAGMENT_WORDS:
        return False
    if _FOLLOW_UP_START.match(text):
        return True
    if _TOPIC_SWITCH.search(text) or _QUESTION_START.match(text):
        return False
    return not text.endswith("?") or len(words) <= ELLIPTICAL_WORDS


_FORMAT_REQUEST = re.compile(
    r"\b(?:into|as|in|to|returns?|outputs?|back as|answer with|respond with)\s+"
    r"(?:(?:an?|valid|one|single|proper)\s+){0,2}(json|yaml|csv|xml)\b"
)


def requested_formats(text: str) -> frozenset[str]:
    """The data formats a prompt asks its answer to be in (`... into JSON`, `return csv`)."""
    return frozenset(m.group(1) for m in _FORMAT_REQUEST.finditer(normalise(text)))


# A file extension (`.sql files`, `*.ts`) names files, not the language the answer is wanted in.
_EXTENSION = re.compile(r"(?<![\w])\*?\.[a-z][\w+#]*")
# The language the prompt wants its code in: the language right before a kind of code (`a bash one-liner`, `python
# script`), unless that code is only handled (`runs a SQL query`, `this bash command`); or `in`/`using` the language
# at the end of a clause (`... in rust`).
_BEFORE_CODE = re.compile(
    r"\s+(?:[\w-]+\s+)?(?:one-liner|one liner|oneliner|script|function|method|class|program|snippet|command|code|"
    r"module|helper|loop|cli|macro|lambda|routine|procedure|app|service|struct|interface|type|query|statement)\b"
)
_HANDLED = re.compile(
    r"\b(?:runs?|calls?|executes?|sends?|builds?|generates?|returns?|with|for|from|of|into|to|this|that|these|"
    r"those|my|our|your)\s+(?:an?\s+|the\s+)?$"
)
_IN_LANGUAGE = re.compile(r"\b(?:in|using)\s+$")
_CLAUSE_END = re.compile(r"\s*(?:[.,;:!?]|$)")


def languages(text: str) -> frozenset[str]:
    """The programming languages a text names (file extensions aside)."""
    normal = _EXTENSION.sub(" ", normalise(text))
    return frozenset(name for name, pattern in LANGUAGES.items() if pattern.search(normal))


def wanted_languages(text: str) -> frozenset[str]:
    """The languages a prompt asks its code to be written in (`write a bash one-liner ...`, `... in python`): the
    answer's language, where `languages` also finds the ones it only mentions (`runs a SQL query`)."""
    normal = _EXTENSION.sub(" ", normalise(text))
    out = set()
    for name, pattern in LANGUAGES.items():
        for m in pattern.finditer(normal):
            before, after = normal[: m.start()], normal[m.end() :]
            names_code = bool(_BEFORE_CODE.match(after)) and not _HANDLED.search(before)
            ends_clause = bool(_IN_LANGUAGE.search(before)) and bool(_CLAUSE_END.match(after))
            if names_code or ends_clause:
                out.add(name)
    return frozenset(out)
