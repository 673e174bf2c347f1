"""The typed engine boundary (pure): what crosses Ray, how sampling keeps its sources, the expert spec."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

from expertserve.decoding import PARAMETERS, Constraint, Resolved, resolve
from expertserve.engine.request import Chunk, EngineRequest, ExpertSpec, Extras, Message, Sampling
from expertserve.errors import ExpertLoadError, ExpertNotServable, InvalidSampling, PromptTooLong
from expertserve.manifest.model import Decoding
from expertserve.registry import Registry
from expertserve.serve.errors import RequestError, client_error
from tests.helpers import make_expert, manifest

NONE = Constraint("none", None, None)


def test_sampling_has_exactly_the_resolved_parameters() -> None:
    assert [f.name for f in dataclasses.fields(Sampling)] == list(PARAMETERS)
    resolved = resolve({"max_tokens": 5}, Decoding(temperature=0.1), {"top_p": 1.0, "temperature": 0.7})
    sampling = Sampling.of(resolved)
    assert dict(sampling.items()) == resolved  # sources kept, nothing rebuilt
    assert sampling.values() == {"temperature": 0.1, "top_p": 1.0, "max_tokens": 5}
    with pytest.raises(KeyError):
        Sampling.of({"temprature": Resolved(1, "request")})


def test_max_tokens_lowered_to_fit_keeps_its_source() -> None:
    sampling = Sampling(max_tokens=Resolved(256, "default"), temperature=Resolved(0.0, "manifest"))
    lowered = sampling.with_max_tokens(10)
    assert lowered.max_tokens == Resolved(10, "default") and lowered.temperature == sampling.temperature
    assert Sampling().with_max_tokens(3).max_tokens == Resolved(3, "default")


def test_requests_are_frozen_and_checked() -> None:
    request = EngineRequest("chat", "r1", Sampling(), NONE, messages=(Message("user", "hi"),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.kind = "completion"  # type: ignore[misc]
    assert request.prompt_param == "messages" and request.extras == Extras()
    with pytest.raises(ValueError):
        EngineRequest("chat", "r2", Sampling(), NONE, prompt="hi")
    with pytest.raises(ValueError):
        EngineRequest("completion", "r3", Sampling(), NONE, messages=(Message("user", "hi"),))
    assert EngineRequest("completion", "r4", Sampling(), NONE, prompt="hi").prompt_param == "prompt"


def test_everything_that_crosses_ray_pickles_unchanged() -> None:
    spec = ExpertSpec("expert-a", "1.0.0", "f" * 64, "/x/adapter", ("/x/soft.safetensors",))
    request = EngineRequest(
        "completion",
        "r",
        Sampling(top_k=Resolved(5, "manifest")),
        Constraint("grammar", 'root ::= "a"', "manifest"),
        spec,
        prompt="p",
        extras=Extras(n=2, seed=3, ignore_eos=True, min_tokens=1),
    )
    chunk = Chunk(0, "a", (1, 2), "stop", 3, 2, 0.5)
    for value in (spec, request, chunk):
        assert pickle.loads(pickle.dumps(value)) == value


def test_expert_spec_from_the_registry(tmp_path: Path) -> None:
    make_expert(tmp_path / "expert-demo", manifest())
    record = Registry.scan([tmp_path]).get("expert-demo")
    spec = record.engine_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (spec.name, spec.version, spec.adapter_dir) == (
        "expert-demo",
        "0.1.0",
        str(tmp_path / "expert-demo" / "adapter"),
    )
    assert spec.soft_prompt_files == (str(tmp_path / "expert-demo" / "soft_prompts" / "style.safetensors"),)
    assert spec.key.startswith("expert-demo@0.1.0+") and spec.content_id == record.content_id
    with pytest.raises(ExpertNotServable):
        record.engine_spec("another/base-model")


def test_a_rewritten_adapter_is_a_different_expert_to_the_engine(tmp_path: Path) -> None:
    expert = make_expert(tmp_path / "expert-demo", manifest())
    before = Registry.scan([tmp_path]).get("expert-demo").content_id
    assert Registry.scan([tmp_path]).get("expert-demo").content_id == before  # stable across scans
    (expert / "adapter" / "adapter_model.safetensors").write_bytes(b"other weights")
    assert Registry.scan([tmp_path]).get("expert-demo").content_id != before


def test_the_same_files_elsewhere_or_touched_are_the_same_expert_to_the_engine(tmp_path: Path) -> None:
    """Finding 13 of the security issue: modification times in the id made every node (and every restart) load
    each mirrored expert again under a new key."""
    import os
    import shutil

    expert = make_expert(tmp_path / "a" / "expert-demo", manifest())
    shutil.copytree(expert, tmp_path / "b" / "expert-demo")  # another node's mirror: new inodes and times
    for path in (tmp_path / "b").rglob("*"):
        os.utime(path, ns=(1, 1))
    ids = {Registry.scan([tmp_path / node]).get("expert-demo").content_id for node in ("a", "b")}
    assert len(ids) == 1


@pytest.mark.parametrize(
    ("error", "status", "param", "code"),
    [
        (PromptTooLong(300, 256, "prompt"), 400, "prompt", "context_length_exceeded"),
        (InvalidSampling("n: must be 1 with temperature 0", "n"), 400, "n", None),
        (ExpertNotServable("expert-a", "DORA"), 400, "model", "expert_not_servable"),
        (ExpertLoadError("expert-a", "no adapter_config.json"), 500, "model", "expert_load_failed"),
    ],
)
def test_domain_errors_map_to_http_once_even_after_pickling(
    error: Exception, status: int, param: str, code: str | None
) -> None:
    wrapped = RuntimeError("ray task failed")
    wrapped.cause = pickle.loads(pickle.dumps(error))  # type: ignore[attr-defined]  # how Ray delivers it
    for e in (error, wrapped):
        mapped = client_error(e)
        assert mapped is not None and (mapped.status, mapped.param, mapped.code) == (status, param, code)
        assert mapped.message == str(error) and mapped.body()["error"]["type"]


def test_bugs_stay_500_and_request_errors_pass_through() -> None:
    assert client_error(KeyError("x")) is None
    error = RequestError(413, "too big")
    assert client_error(error) is error


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [("BackPressureError", 503, "overloaded"), ("ActorDiedError", 503, "engine_unavailable")],
)
def test_ray_errors_by_name_without_importing_ray(name: str, status: int, code: str) -> None:
    ray_error = type(name, (Exception,), {"__module__": "ray.exceptions"})("gone")
    mapped = client_error(ray_error)
    assert mapped is not None and (mapped.status, mapped.code) == (status, code) and mapped.retry_after
    assert client_error(type(name, (Exception,), {})("not ray's")) is None


def test_coalesce_joins_chunks_per_choice() -> None:
    from expertserve.engine.request import Chunk, TokenLogprob, coalesce

    lp = TokenLogprob("a", 1, -0.5, ())
    chunks = [
        Chunk(0, "he", (1,), None, 5, 1, 0.2, (lp,), (lp,)),
        Chunk(1, "x", (9,), None, 5, 1),
        Chunk(0, "llo", (2, 3), None, 5, 3, 0.0, (lp, lp)),
        Chunk(0, "!", (4,), "stop", 5, 4),
    ]
    joined = coalesce(chunks)
    assert [c.index for c in joined] == [0, 1]
    first = joined[0]
    assert (first.text, first.token_ids, first.finish_reason, first.completion_tokens) == (
        "hello!",
        (1, 2, 3, 4),
        "stop",
        4,
    )
    assert first.load_seconds == 0.2 and len(first.logprobs) == 3 and first.prompt_logprobs == (lp,)
    assert joined[1] == chunks[1] and coalesce([]) == []


class _EngineDeadError(Exception):
    """Stands for vLLM's EngineDeadError (the table maps it by module and name)."""


_EngineDeadError.__module__ = "vllm.v1.engine.exceptions"
_EngineDeadError.__name__ = "EngineDeadError"


class _Engines:
    """A deployment handle whose `generate` streams are made by `answer(call number)`: an error it raises (before the
    first chunk, as a replica that failed), or the first chunk it returns."""

    def __init__(self, answer: Callable[[int], object]) -> None:
        self.answer = answer
        self.calls = 0

    def options(self, **_: object) -> _Engines:
        return self

    @property
    def generate(self) -> _Engines:
        return self

    def remote(self, request: EngineRequest) -> object:
        self.calls += 1
        call = self.calls

        async def stream():  # type: ignore[no-untyped-def]
            yield self.answer(call)

        return stream()


def _engine_core_dies(call: int) -> object:
    raise _EngineDeadError("engine core died")


def test_a_request_that_takes_down_engines_twice_is_not_sent_to_a_third() -> None:
    """Finding 15 of the security issue: a request that killed an engine core was sent again to the other
    replicas for `engine_retry_s` (120 s), taking every one of them down."""
    import asyncio

    from expertserve.serve.config import ServeConfig
    from expertserve.serve.metrics import Metrics
    from expertserve.serve.respond import MAX_ENGINE_LOSSES, Responder

    engines = _Engines(_engine_core_dies)
    responder = Responder(engine=engines, config=ServeConfig(), metrics=Metrics())
    poison = EngineRequest("chat", "r1", Sampling(), NONE, messages=(Message("user", "poison"),))
    with pytest.raises(RequestError) as info:
        asyncio.run(responder._start(poison))
    assert engines.calls == MAX_ENGINE_LOSSES == 2
    assert info.value.status == 503 and info.value.code == "engine_failed_on_request"
    again = dataclasses.replace(poison, request_id="r2")  # the client sends it again
    with pytest.raises(RequestError, match="took down the engine twice"):
        asyncio.run(responder._start(again))
    assert engines.calls == 2  # refused without reaching an engine
    other = dataclasses.replace(poison, messages=(Message("user", "fine"),))
    with pytest.raises(RequestError):
        asyncio.run(responder._start(other))
    assert engines.calls == 4  # another request still gets its one retry


def test_a_request_refused_by_a_restarting_replica_waits_and_is_sent_again_without_counting_a_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from ray.exceptions import RayTaskError

    from expertserve.errors import EngineRestarting
    from expertserve.serve.config import ServeConfig
    from expertserve.serve.metrics import Metrics
    from expertserve.serve.respond import MAX_REPLICA_LOSSES, Responder

    def restarting(call: int) -> object:
        if call <= MAX_REPLICA_LOSSES + 1:  # more refusals than any loss budget
            raise RayTaskError("generate", "", EngineRestarting("restarting")).as_instanceof_cause()
        return "first chunk"

    engines = _Engines(restarting)
    responder = Responder(engine=engines, config=ServeConfig(), metrics=Metrics())
    request = EngineRequest("chat", "r1", Sampling(), NONE, messages=(Message("user", "hi"),))
    import expertserve.serve.respond as respond

    original = respond.asyncio.sleep

    async def no_wait(_: float) -> None:
        await original(0)

    monkeypatch.setattr(respond.asyncio, "sleep", no_wait)
    _, first = asyncio.run(responder._start(request))
    assert first == "first chunk" and engines.calls == MAX_REPLICA_LOSSES + 2
