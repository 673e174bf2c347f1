"""Server settings from file, environment and command line, in that order of precedence, and config errors as one
line per problem naming the key and where it came from (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertserve.serve.config import ConfigError, ServeConfig, env_values


def test_command_line_over_environment_over_file_over_defaults(tmp_path: Path) -> None:
    file = tmp_path / "serve.yaml"
    file.write_text("port: 9000\nhost: 0.0.0.0\nengine:\n  dtype: bfloat16\n  max_loras: 2\n")
    env = {
        "EXPERTSERVE_PORT": "9100",
        "EXPERTSERVE_API_KEYS": "k1, k2",
        "EXPERTSERVE_ADMIN_KEY": "adm",
        "EXPERTSERVE_ENGINE__DTYPE": "float32",
        "EXPERTSERVE_REPLICAS__NUM_REPLICAS": "3",
        "EXPERTSERVE_HOME": "/tmp/not-a-server-setting",
        "OTHER": "x",
    }
    config = ServeConfig.load(file, environ=env, overrides={"port": 9200})
    assert (config.port, config.host) == (9200, "0.0.0.0")
    assert config.api_keys == ["k1", "k2"] and config.admin_key == "adm"
    assert (config.engine.dtype, config.engine.max_loras, config.replicas.num_replicas) == ("float32", 2, 3)
    assert (
        ServeConfig.load(file, environ={"EXPERTSERVE_API_KEYS": "k"}).port == 9000
        and ServeConfig.load(environ={}) == ServeConfig()
    )


def test_json_values_in_the_environment() -> None:
    assert env_values({"EXPERTSERVE_API_KEYS": '["a,b", "c"]', "EXPERTSERVE_ROUTING__ENABLED": "false"}) == {
        "api_keys": ["a,b", "c"],
        "routing": {"enabled": False},
    }


def test_config_errors_are_one_line_per_problem_naming_key_and_source(tmp_path: Path) -> None:
    file = tmp_path / "serve.yaml"
    file.write_text("port: 70000\nengine:\n  dtype: fp8\n  dtpye: x\n")
    with pytest.raises(ConfigError) as info:
        ServeConfig.load(file, environ={"EXPERTSERVE_MAX_BODY_BYTES": "12"})
    lines = str(info.value).splitlines()
    assert len(lines) == 4 and all(
        line.startswith(f"{file} and EXPERTSERVE_* environment variables: ") for line in lines
    )
    text = "\n".join(lines)
    assert "port: input should be less than or equal to 65535 (got 70000)" in text
    assert "engine.dtype: input should be" in text and "(got 'fp8')" in text
    assert "engine.dtpye: unknown setting" in text and "max_body_bytes: input should be greater" in text
    for bad, message in (("[1, 2]", "expected a mapping of settings"), ("port: [", "cannot read it")):
        file.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            ServeConfig.from_file(file)


def test_secrets_are_not_in_the_error_lines() -> None:
    with pytest.raises(ConfigError) as info:
        ServeConfig.load(environ={"EXPERTSERVE_ADMIN_KEY": " ", "EXPERTSERVE_PORT": "x"})
    assert "admin_key" in str(info.value)


def test_a_wrong_secret_is_named_but_never_shown() -> None:
    with pytest.raises(ConfigError) as info:
        ServeConfig.load(environ={"EXPERTSERVE_API_KEYS": '["s3cret", 5]'})
    assert (
        "api_keys[1]" in str(info.value) and "s3cret" not in str(info.value) and "5)" not in str(info.value)
    )


def test_other_tools_variables_are_not_server_settings() -> None:
    env = {"EXPERTSERVE_CLUSTER_DIR": "/tmp/x", "EXPERTSERVE_HOME": "/h", "EXPERTSERVE_ENGINE__DTPYE": "x"}
    assert env_values(env) == {"engine": {"dtpye": "x"}}
    with pytest.raises(ConfigError, match="engine.dtpye: unknown setting"):
        ServeConfig.load(environ=env)


def test_the_data_plane_switch_for_rays_processes_and_the_ingress_handles() -> None:
    from expertserve.serve.transport import GRPC_SWITCH, by_reference, ray_env

    assert ray_env(True)[GRPC_SWITCH] == "1" and ray_env(False)[GRPC_SWITCH] == "0"
    assert by_reference(True) is False and by_reference(False) is True
    assert ServeConfig.load(None, environ={"EXPERTSERVE_GRPC_DATA_PLANE": "false"}).grpc_data_plane is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EXPERTSERVE_API_KEYS": ""}, "api_keys[0]: an empty or null key"),
        ({"EXPERTSERVE_API_KEYS": " , "}, "api_keys[0]: an empty or null key"),
        (
            {"EXPERTSERVE_API_KEYS": "k1", "EXPERTSERVE_ADMIN_KEY": "null"},
            "unset admin_key for loopback-only",
        ),
        ({"EXPERTSERVE_API_KEYS": "k1", "EXPERTSERVE_ADMIN_KEY": ""}, "unset admin_key for loopback-only"),
        ({"EXPERTSERVE_HOST": "0.0.0.0"}, "listens beyond loopback with no api_keys"),
    ],
)
def test_empty_key_settings_never_turn_auth_off(env: dict[str, str], message: str) -> None:
    """Finding 11 of the security issue: an empty Secret value meant "no auth", `null` meant "no admin key"."""
    with pytest.raises(ConfigError) as info:
        ServeConfig.load(environ=env)
    assert message in str(info.value)


def test_no_auth_beyond_loopback_only_when_asked() -> None:
    config = ServeConfig.load(environ={"EXPERTSERVE_HOST": "0.0.0.0", "EXPERTSERVE_ALLOW_NO_AUTH": "true"})
    assert config.api_keys == [] and config.allow_no_auth
    assert ServeConfig.load(environ={"EXPERTSERVE_HOST": "127.0.0.1"}).api_keys == []
