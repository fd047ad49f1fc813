"""The environment rule both sides check (studios_shared.environment, issue 13)."""

from __future__ import annotations

import pytest

from studios_shared.environment import (
    AGENT_NAMES,
    HOOK_NAMES,
    MAX_TOTAL,
    check_environment,
    environment_refusal,
)


@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "LD_AUDIT",
        "DYLD_INSERT_LIBRARIES",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONUNBUFFERED",
        "PERL5LIB",
        "PERLLIB",
        "RUBYOPT",
        "NODE_OPTIONS",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "R_PROFILE_USER",
        "R_ENVIRON_USER",
        "LUA_INIT",
        "IPYTHONDIR",
        "JUPYTER_PATH",
        "GIT_SSH_COMMAND",
        "GIT_CONFIG_COUNT",
        "BASH_ENV",
        "ENV",
        "PS4",
        "PROMPT_COMMAND",
        "IFS",
        "GCONV_PATH",
        "LOCPATH",
        "HOSTALIASES",
        "RES_OPTIONS",
        "OPENSSL_CONF",
        "BROWSER",
        "STUDIOS_ANYTHING",
        "CONNECT_TOOL_PORT",
        # The proxy's secret: a studio must not choose what its tool believes.
        "CONNECT_PROXY_SECRET",
        "HOME",
        "PATH",
        "USER",
        "LOGNAME",
        "Ld_Preload",
    ],
)
def test_refused_names_are_named(name: str) -> None:
    refusal = environment_refusal({"FINE": "1", name: "x"})
    assert refusal.startswith(f"environment variable {name} is not allowed: "), refusal
    with pytest.raises(ValueError, match=name):
        check_environment({name: "x"})


def test_every_listed_name_is_refused() -> None:
    for name in {**HOOK_NAMES, **AGENT_NAMES}:
        assert environment_refusal({name: "x"}), name


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"GREETING": "hello\tworld"},
        {"NODE_ENV": "production", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC"},
        {"TMPDIR": "/workspace/tmp", "HTTP_PROXY": "http://p:3128", "SSL_CERT_FILE": "/x.pem"},
        {"GIT_AUTHOR_NAME": "Ada", "RUBY_GC_HEAP_INIT_SLOTS": "1", "JULIA_NUM_THREADS": "4"},
        {"_": "", "a1": "1"},
    ],
)
def test_ordinary_variables_pass(env: dict[str, str]) -> None:
    assert environment_refusal(env) == ""
    check_environment(env)


def test_malformed_and_oversized() -> None:
    assert "'A=B'" in environment_refusal({"A=B": "x"})
    assert "'A B'" in environment_refusal({"A B": "x"})
    assert "''" in environment_refusal({"": "x"})
    assert "at most 128" in environment_refusal({"N" * 129: "x"})
    for bad in ("a\nb", "a\rb", "a\x00b", "a\x1bb", "a\x7fb"):
        assert "control characters" in environment_refusal({"NOTE": bad}), repr(bad)
    assert "a value is at most" in environment_refusal({"BIG": "x" * (32 * 1024 + 1)})
    many = {f"V{i}": "x" * 30000 for i in range(10)}
    assert f"at most {MAX_TOTAL} bytes" in environment_refusal(many)
    assert "at most 256" in environment_refusal({f"V{i}": "" for i in range(257)})
