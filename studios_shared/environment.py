"""Which variables a studio's `configuration.environment` may set in its tool.

One rule, checked twice: by the controller when a studio is created, edited or started
(400 naming the variable) and by the agent before any runtime starts a tool (the start
errors naming it, whatever the database says). docs/contract-notes.md, "Session
environment", lists the names and why.

Refused:

- names that are not `[A-Za-z_][A-Za-z0-9_]*` (an `=` or a NUL cannot be passed in an
  environment at all; `BASH_FUNC_f%%` would define a bash function), more than
  `MAX_VARIABLES` variables, a name longer than `MAX_NAME`, a value longer than
  `MAX_VALUE`, more than `MAX_TOTAL` bytes in all;
- control characters in a value (NUL cannot be passed; CR and LF split the lines of
  every tool that writes its environment into a file or a header), TAB excepted;
- names that make a program load or run code it was not asked to: the dynamic loader's
  and glibc's (every name glibc itself ignores in a set-user-ID program, `unsecvars.h`,
  but `TMPDIR`, which names where files go rather than code; plus `LD_*` and macOS's
  `DYLD_*`), the interpreters' start-up hooks (`PYTHON*`, Perl,
  Ruby, Node.js, Java, R, Lua, Tcl, the shells' `BASH_ENV`/`ENV`/`PS4`/...), Jupyter's
  and IPython's configuration directories (Python code run at start), git's
  command hooks, OpenSSL's configuration and engines, and `BROWSER` (run by Python's
  `webbrowser`, e.g. on `import antigravity`);
- names the agent sets itself, which a studio must not override: `STUDIOS_*` and
  `CONNECT_*` (the tool's port, its label, what the proxy and the tool share), and
  `HOME`, `PATH`, `USER`, `LOGNAME` (who and where the tool is, set by the runtime).

Names are compared without regard to case: nothing legitimate is spelled `ld_preload`,
and a refusal is cheaper than finding out which program reads which spelling.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "AGENT_NAMES",
    "AGENT_PREFIXES",
    "HOOK_NAMES",
    "HOOK_PREFIXES",
    "MAX_NAME",
    "MAX_TOTAL",
    "MAX_VALUE",
    "MAX_VARIABLES",
    "check_environment",
    "environment_refusal",
]

MAX_VARIABLES = 256
MAX_NAME = 128
MAX_VALUE = 32 * 1024
# Linux allows 128 KiB per string and a quarter of the stack for all of them; the tool
# needs room for its own arguments and the variables the runtime adds.
MAX_TOTAL = 256 * 1024

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# C0 controls but TAB, and DEL.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# Prefix -> why. Checked against the upper-cased name.
HOOK_PREFIXES: dict[str, str] = {
    "LD_": "the dynamic loader reads it (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT load code "
    "into every program)",
    "DYLD_": "the macOS dynamic loader reads it (DYLD_INSERT_LIBRARIES loads code)",
    "PYTHON": "Python reads it at start (PYTHONSTARTUP, PYTHONPATH, PYTHONWARNINGS and "
    "PYTHONHOME run or import code of its choosing)",
    "PERL5": "Perl reads it at start (PERL5OPT, PERL5LIB, PERL5DB load code)",
    "R_PROFILE": "R runs that file at start",
    "R_ENVIRON": "R reads that file at start",
    "R_LIBS": "R loads packages from it",
    "LUA_": "Lua reads it at start (LUA_INIT runs code, LUA_PATH loads modules)",
    "JUPYTER_": "Jupyter reads it at start (its configuration is Python code it runs)",
    "IPYTHON": "IPython reads it at start (its profile's startup files are run)",
    "BASH_FUNC_": "bash defines functions from it",
    "GIT_CONFIG": "git reads configuration from it (core.fsmonitor, core.pager, ... run commands)",
}

# Name -> why. Checked against the upper-cased name.
HOOK_NAMES: dict[str, str] = {
    # glibc's unsecvars.h (what it ignores in set-user-ID programs) not covered above.
    "GCONV_PATH": "glibc loads character-set converters from it",
    "GETCONF_DIR": "glibc reads it (unsecvars.h)",
    "GLIBC_TUNABLES": "glibc's loader reads it at start",
    "HOSTALIASES": "glibc's resolver reads that file",
    "LOCALDOMAIN": "glibc's resolver reads it",
    "LOCPATH": "glibc loads locale data from it",
    "NIS_PATH": "glibc reads it (unsecvars.h)",
    "NLSPATH": "glibc loads message catalogs from it",
    "RESOLV_HOST_CONF": "glibc's resolver reads that file",
    "RES_OPTIONS": "glibc's resolver reads it",
    "MALLOC_TRACE": "glibc's allocator writes a trace to that file",
    "TZDIR": "glibc loads time zone data from it",
    # Interpreters not matched by a prefix.
    "PERLLIB": "Perl loads modules from it",
    "RUBYOPT": "Ruby reads it at start (-r loads code)",
    "RUBYLIB": "Ruby loads libraries from it",
    "NODE_OPTIONS": "Node.js reads it at start (--require loads code)",
    "NODE_PATH": "Node.js loads modules from it",
    "NODE_REPL_EXTERNAL_MODULE": "Node.js loads that module instead of its REPL",
    "JULIA_LOAD_PATH": "Julia loads code from it",
    "JULIA_DEPOT_PATH": "Julia loads code (startup.jl, packages) from it",
    "PERLIO": "Perl loads I/O layers (code) named in it",
    "PERL_MB_OPT": "Perl's module builds read it",
    "PERL_MM_OPT": "Perl's module builds read it",
    "JAVA_TOOL_OPTIONS": "every Java VM reads it at start (-javaagent loads code)",
    "_JAVA_OPTIONS": "the Java VM reads it at start (-javaagent loads code)",
    "JDK_JAVA_OPTIONS": "the java launcher reads it at start (-javaagent loads code)",
    "CLASSPATH": "Java loads classes from it",
    "TCLLIBPATH": "Tcl loads packages from it",
    "PHPRC": "PHP reads that configuration at start (auto_prepend_file runs code)",
    "PHP_INI_SCAN_DIR": "PHP reads configuration from it at start",
    # Shells.
    "BASH_ENV": "bash runs that file at the start of every script",
    "ENV": "sh runs that file at start",
    "SHELLOPTS": "bash takes its options from it",
    "BASHOPTS": "bash takes its options from it",
    "PS4": "bash expands it (running commands) when tracing",
    "PROMPT_COMMAND": "bash runs it before every prompt",
    "IFS": "shells split words by it",
    "CDPATH": "shells resolve cd through it",
    "ZDOTDIR": "zsh runs start-up files from it",
    # Programs run without being asked.
    "BROWSER": "Python's webbrowser runs it (e.g. on `import antigravity`), as do Jupyter "
    "and many command-line tools",
    "GIT_SSH": "git runs it",
    "GIT_SSH_COMMAND": "git runs it",
    "GIT_ASKPASS": "git runs it",
    "SSH_ASKPASS": "ssh runs it",
    "GIT_EXEC_PATH": "git runs its commands from it",
    "GIT_PROXY_COMMAND": "git runs it",
    "GIT_EXTERNAL_DIFF": "git runs it",
    "GIT_TEMPLATE_DIR": "git copies hooks (run later) from it",
    "OPENSSL_CONF": "OpenSSL reads that configuration (which loads engines: code)",
    "OPENSSL_ENGINES": "OpenSSL loads engines (code) from it",
}

# Names the agent sets in the tool's environment itself.
AGENT_PREFIXES: dict[str, str] = {
    "STUDIOS_": "the agent sets the STUDIOS_* variables of a tool itself",
    "CONNECT_": "the agent sets the CONNECT_* variables of a tool itself (its port, what "
    "the proxy and the tool share)",
}
AGENT_NAMES: dict[str, str] = {
    "HOME": "the agent sets it (the session directory)",
    "PATH": "the agent sets it (a fixed search path)",
    "USER": "the agent sets it (the user the tool runs as)",
    "LOGNAME": "the agent sets it (the user the tool runs as)",
}


def _name_refusal(name: str) -> str:
    upper = name.upper()
    why = AGENT_NAMES.get(upper) or HOOK_NAMES.get(upper)
    if why:
        return why
    for table in (AGENT_PREFIXES, HOOK_PREFIXES):
        for prefix, reason in table.items():
            if upper.startswith(prefix):
                return reason
    return ""


def environment_refusal(env: Mapping[str, str]) -> str:
    """Why `env` may not be a tool's environment ("" when it may), naming the first
    variable that breaks the rule."""
    if len(env) > MAX_VARIABLES:
        return f"at most {MAX_VARIABLES} environment variables, got {len(env)}"
    total = 0
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            return f"environment variable {name!r}: names and values must be strings"
        shown = name if _NAME.match(name) and len(name) <= MAX_NAME else repr(name[:MAX_NAME])
        if len(name) > MAX_NAME:
            return f"environment variable {shown}: a name is at most {MAX_NAME} characters"
        if not _NAME.match(name):
            return (
                f"environment variable {shown}: a name is a letter or '_' followed by "
                "letters, digits and '_'"
            )
        why = _name_refusal(name)
        if why:
            return f"environment variable {name} is not allowed: {why}"
        if len(value) > MAX_VALUE:
            return f"environment variable {name}: a value is at most {MAX_VALUE} characters"
        if _CONTROL.search(value):
            return (
                f"environment variable {name}: control characters (NUL, CR, LF, ...) are not "
                "allowed in a value"
            )
        total += len(name.encode()) + len(value.encode()) + 2
        if total > MAX_TOTAL:
            return f"environment variables: at most {MAX_TOTAL} bytes in all (at {name})"
    return ""


def check_environment(env: Mapping[str, str]) -> None:
    """Raise ValueError naming the first variable of `env` that breaks the rule."""
    refusal = environment_refusal(env)
    if refusal:
        raise ValueError(refusal)
