"""A small Dockerfile reader: stages, their instructions, ARG/ENV as a build would see them.

Enough of the Dockerfile syntax for this project's Dockerfile (and for refusing what it does
not understand): line continuations, comments, parser directives, ``--flag=value`` options,
exec (JSON) forms, ``ARG``/``ENV`` with ``$VAR``, ``${VAR}``, ``${VAR:-x}`` and ``${VAR:+x}``.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_]\w*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)


def expand(text: str, env: dict[str, str]) -> str:
    """Docker's build-time substitution of ``$VAR``, ``${VAR}``, ``${VAR:-x}``, ``${VAR:+x}``."""

    def sub(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("bare")
        value = env.get(name, "")
        op = m.group("op")
        if op == "-":
            return value or m.group("word")
        if op == "+":
            return m.group("word") if value else ""
        return value

    return _VAR.sub(sub, text)


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    flags: tuple[tuple[str, str], ...]  # leading --name=value options, in order
    rest: str  # the arguments after the flags
    line: int

    def flag(self, name: str) -> str | None:
        return next((v for k, v in self.flags if k == name), None)

    def flag_values(self, name: str) -> list[str]:
        return [v for k, v in self.flags if k == name]

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None (shell form)."""
        text = self.rest.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"line {self.line}: exec form must be a JSON array of strings")
        return value


@dataclass
class Stage:
    name: str | None
    base: str  # the FROM argument, ARGs expanded
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"{self.path}: no stage named {name!r}")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages if s.name]

    def environment(
        self,
        name: str,
        build_args: dict[str, str] | None = None,
        base_env: dict[str, str] | None = None,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """(ARG values, ENV values) at the end of stage ``name``, following ``FROM <stage>``
        for inherited ENV. ``build_args`` plays ``--build-arg``; unset ARGs use defaults;
        ``base_env`` stands for the environment of an external base image (e.g. its PATH)."""
        build_args = build_args or {}
        stage = self.stage(name)
        if stage.base in self.stage_names:
            env = dict(self.environment(stage.base, build_args, base_env)[1])
        else:
            env = dict(base_env or {})
        args: dict[str, str] = {}
        for ins in stage.instructions:
            scope = {**args, **env}
            if ins.keyword == "ARG":
                key, _, default = ins.rest.strip().partition("=")
                if key in build_args:
                    args[key] = build_args[key]
                elif "=" in ins.rest:
                    args[key] = expand(_unquote(default), scope)
                elif key in self.global_args:
                    args[key] = self.global_args[key]
            elif ins.keyword == "ENV":
                for key, value in parse_env(ins.rest):
                    env[key] = expand(value, scope)
        return args, env


def _unquote(value: str) -> str:
    parts = shlex.split(value)
    return parts[0] if parts else ""


def parse_env(rest: str) -> list[tuple[str, str]]:
    """``ENV a=1 b="x y"`` -> [("a", "1"), ("b", "x y")]; the legacy ``ENV a 1`` too."""
    tokens = shlex.split(rest, posix=True)
    if tokens and "=" not in tokens[0]:
        return [(tokens[0], " ".join(tokens[1:]))]
    pairs = []
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if not sep:
            raise ValueError(f"ENV token without '=': {tok!r}")
        pairs.append((key, value))
    return pairs


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Instructions with their continuations joined; comment lines dropped (also inside
    a continuation, as Docker does)."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].rstrip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(p for p in buf if p)))
        buf = []
    if buf:
        raise ValueError("the Dockerfile ends inside a line continuation")
    return out


_FLAG = re.compile(r"--(?P<name>[a-z-]+)(?:=(?P<value>\S*))?\s*")


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        flags: list[tuple[str, str]] = []
        rest = rest.strip()
        if keyword in ("RUN", "COPY", "ADD", "FROM", "HEALTHCHECK"):
            while m := _FLAG.match(rest):
                flags.append((m.group("name"), m.group("value") or ""))
                rest = rest[m.end() :]
        if keyword == "FROM":
            words = rest.split()
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                raise ValueError(f"line {line}: cannot read FROM {rest!r}")
            base = expand(words[0], global_args)
            stages.append(Stage(words[2] if len(words) == 3 else None, base, line))
            continue
        if not stages:
            if keyword != "ARG":
                raise ValueError(f"line {line}: only ARG may precede the first FROM")
            key, _, default = rest.partition("=")
            global_args[key] = _unquote(default)
            continue
        stages[-1].instructions.append(Instruction(keyword, tuple(flags), rest, line))
    return Dockerfile(path, global_args, stages)


def healthcheck_command(ins: Instruction) -> list[str]:
    """``HEALTHCHECK [options] CMD ["exe", ...]`` -> the exec-form argv."""
    head, _, tail = ins.rest.partition(" ")
    if head.upper() != "CMD":
        raise ValueError(f"line {ins.line}: HEALTHCHECK without CMD")
    argv = Instruction("CMD", (), tail, ins.line).exec_form()
    if argv is None:
        raise ValueError(f"line {ins.line}: HEALTHCHECK CMD is not in exec form")
    return argv
