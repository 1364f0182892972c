"""Every script's --help says what each flag does and its default; a method's flags carry the
comment its Config gives the field."""
import argparse
import dataclasses
import re

import pytest

import bench
import eval as evaluate
import export
import generate
import methods
import planted
import train
import training

SCRIPTS = {"train": train, "eval": evaluate, "export": export, "generate": generate, "planted": planted,
           "bench": bench}


class Parsed(Exception):
    pass


def parser_of(module, argv, monkeypatch):
    """The ArgumentParser a script's main() builds, caught as it parses."""
    seen = []

    def catch(self, args=None, namespace=None):
        seen.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Parsed):
        module.main(argv)
    return seen[-1]


def flags(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_says_what_it_does_and_its_default(script, monkeypatch):
    parser = parser_of(SCRIPTS[script], ["--help"], monkeypatch)
    for action in flags(parser):
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        assert text.strip(), f"{script}.py {action.option_strings[0]} has no help"
        assert "%" not in text.replace("%%", "") or "% of" in text  # a stray format character
        assert "default" in text or "required" in text or action.default is False, f"{script}.py {action.option_strings[0]}: {text!r} does not say its default"
        assert "default: None" not in text


@pytest.mark.parametrize("name", methods.NAMES)
def test_method_flags_carry_their_config_comment(name, monkeypatch):
    parser = parser_of(train, ["--method", name, "--help"], monkeypatch)
    method = methods.get(name)
    comments = training.field_comments(method.Config)
    assert comments.keys() == {f.name for f in dataclasses.fields(method.Config)}  # every field documented
    helps = {a.dest: parser._get_formatter()._expand_help(a) for a in flags(parser)}
    for field, comment in comments.items():
        words = re.sub(r"None(: | -> )", "default: ", comment)
        assert helps[field].startswith(words), (field, helps[field])
        assert "default" in helps[field], (field, helps[field])


def test_a_comment_is_read_from_its_fields_line_only():
    @dataclasses.dataclass
    class Made:
        a: int = 1  # the first
        b: str = "#"  # the second, after a '#' in a string
        c: float = 2.0

        def f(self):  # not a field
            return 0

        # a comment above a field is not its help
        d: int = 3  # the fourth,
                    # on two lines

    assert training.field_comments(Made) == {"a": "the first", "b": "the second, after a '#' in a string",
                                             "d": "the fourth, on two lines"}
