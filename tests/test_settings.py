"""Settings are defined once, on the config dataclasses: the CLI, the checks and job command lines follow."""

import argparse
from dataclasses import dataclass

import pytest

from llmb.assistant.config import ChatSampling
from llmb.assistant.config import TrainConfig as QLoRAConfig
from llmb.errors import UserError
from llmb.settings import (
    add_arguments,
    app_values,
    check,
    check_number,
    from_args,
    from_values,
    parse,
    resolve_by_device,
    setting,
    spec_of,
    specs,
    to_argv,
)
from llmb.story.config import StorySampling
from llmb.story.config import TrainConfig as StoryConfig

CONFIGS = [StoryConfig, QLoRAConfig]


@dataclass
class Toy:
    name: list = setting(help="inputs", factory=list, required=True)
    layers: int = setting(4, "blocks", low=1, high=64, label="Layers", form=True)
    lr: float | str = setting(1e-3, "learning rate or auto", low=1e-8, high=10.0, words=("auto",))
    limit: float | None = setting(None, "seconds", low=1.0, high=100.0)
    mode: str = setting("a", "a mode", choices=("a", "b"))
    fast: bool = setting(False, "go fast")
    bar: bool = setting(True, "show a bar")


def parser_for(cls):
    p = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(p, cls)
    return p


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_setting_has_help_and_numbers_have_a_range(cls):
    for spec in specs(cls):
        assert spec.help, f"{cls.__module__}.{spec.name} has no help text"
        if spec.kind in (int, float):
            assert spec.low is not None and spec.high is not None, f"{spec.name} has no range"
            if spec.default is not None and spec.default not in spec.words:
                assert spec.low <= spec.default <= spec.high, f"{spec.name}'s default is outside its range"
        if spec.form:
            assert spec.label, f"{spec.name} is on the app's form without a label"


@pytest.mark.parametrize("cls", CONFIGS)
def test_defaults_pass_their_own_checks_and_round_trip_through_the_command_line(cls):
    cfg = cls(data=["books"], out="runs/x")
    check(cfg)
    argv = to_argv(cfg)
    assert from_args(cls, parser_for(cls).parse_args(argv)) == cfg


def test_command_line_round_trip_of_changed_values():
    cfg = Toy(name=["a", "b"], layers=7, lr="auto", limit=2.5, mode="b", fast=True, bar=False)
    argv = to_argv(cfg)
    assert argv == ["--name", "a", "b", "--layers", "7", "--lr", "auto", "--limit", "2.5", "--mode", "b",
                    "--fast", "--no-bar"]
    assert from_args(Toy, parser_for(Toy).parse_args(argv)) == cfg
    assert to_argv(Toy(name=["a"])) == ["--name", "a"]  # defaults are left out, required values are not


def test_cli_refuses_out_of_range_values_naming_the_flag():
    p = parser_for(Toy)
    with pytest.raises(argparse.ArgumentError, match="--layers.*between 1 and 64"):
        p.parse_args(["--name", "x", "--layers", "0"])
    with pytest.raises(argparse.ArgumentError, match="--lr.*'auto'"):
        p.parse_args(["--name", "x", "--lr", "fast"])
    with pytest.raises(argparse.ArgumentError, match="--mode"):
        p.parse_args(["--name", "x", "--mode", "c"])
    assert p.parse_args(["--name", "x", "--lr", "auto"]).lr == "auto"


def test_help_shows_default_and_range():
    text = parser_for(StoryConfig).format_help()
    assert "--n-head" in text and "attention heads per block (default: 4) [a whole number from 1 to 64]" in " ".join(text.split())


def test_parse_values_as_a_form_sends_them():
    layers = spec_of(Toy, "layers")
    assert parse(layers, "12") == 12 and parse(layers, 12.0) == 12
    with pytest.raises(UserError, match="Layers must be a whole number"):
        parse(layers, "2.5", label="Layers")
    with pytest.raises(UserError, match="is empty"):
        parse(layers, " ")
    assert parse(spec_of(Toy, "limit"), "") is None  # optional: empty means no limit
    assert parse(spec_of(Toy, "name"), "a, b,c") == ["a", "b", "c"]
    with pytest.raises(UserError, match="true or false"):
        parse(spec_of(Toy, "fast"), "maybe")


@pytest.mark.parametrize("value, message", [
    (float("nan"), "finite"), (float("inf"), "finite"), ("1e400", "finite"), (True, "must be a number"),
    ([1], "must be a number"), ("ten", "must be a number"), (0, "between 1 and 64"), (65, "between 1 and 64"),
])
def test_check_number_refuses_what_is_not_a_number_in_range(value, message):
    with pytest.raises(UserError, match=message):
        check_number("layers", value, 1, 64, int)


def test_from_values_names_unknown_and_bad_fields_and_runs_the_class_check():
    with pytest.raises(UserError, match="'colour' is not a setting"):
        from_values(Toy, {"name": ["a"], "colour": "red"})
    with pytest.raises(UserError, match="Layers must be between 1 and 64"):
        from_values(Toy, {"name": ["a"], "layers": "100"}, labels=True)
    with pytest.raises(UserError, match="--n-embd 100 must split into --n-head 3"):
        from_values(StoryConfig, {"data": ["x"], "n_embd": 100, "n_head": 3})


def test_check_catches_bad_values_set_in_code():
    with pytest.raises(UserError, match="--lora-r must be between"):
        check(QLoRAConfig(out="x", lora_r=0))
    with pytest.raises(UserError, match="--batch-size must be a whole number from 1 to 4096 or 'auto'"):
        check(QLoRAConfig(out="x", batch_size=0))


def test_check_number_takes_huge_values_as_out_of_range_and_whole_numbers_exactly():
    """A float cannot hold 10**400 (OverflowError) nor tell 2**64 - 1 from 2**64: neither may slip through."""
    with pytest.raises(UserError, match="a finite number .got a number of 401 digits"):
        check_number("max tokens", 10**400)
    for huge in (10**400, -10**400, "9" * 5000, float(10**300)):
        with pytest.raises(UserError, match="layers must be between 1 and 64 .got "):
            check_number("layers", huge, 1, 64, int)
    assert check_number("seed", 2**64 - 1, 0, 2**64 - 1, int) == 2**64 - 1
    assert check_number("seed", str(2**64 - 1), 0, 2**64 - 1, int) == 2**64 - 1
    with pytest.raises(UserError, match="between 0 and 18446744073709551615 .got 18446744073709551616"):
        check_number("seed", 2**64, 0, 2**64 - 1, int)


@pytest.mark.parametrize("sampling, message", [
    (dict(temperature=1e-300), "temperature must be 0 .greedy. or at least 0.01"),
    (dict(max_new_tokens=10**400), "max new tokens must be between 1 and 1e\\+06"),
    (dict(seed=1180591620717411303424), "seed must be between 0 and"),
    (dict(seed=-1), "seed must be between 0 and"),
])
def test_the_sampling_check_refuses_extreme_numbers(sampling, message):
    with pytest.raises(UserError, match=message):
        check(ChatSampling(**{"max_new_tokens": 10, "temperature": 0.7, **sampling}))
    check(ChatSampling(max_new_tokens=10, temperature=0))  # greedy
    check(ChatSampling(max_new_tokens=10, temperature=0.01, seed=2**64 - 1))


@pytest.mark.parametrize("cls", [StorySampling, ChatSampling])
def test_sampling_settings_name_themselves_and_the_app_holds_to_its_narrower_range(cls):
    for spec in specs(cls):
        assert spec.help and spec.label and spec.called and spec.app_range, spec.name
        if spec.default is not None:
            assert spec.low <= spec.default <= (spec.high or spec.default), spec.name
            assert spec.app_range[0] <= spec.default <= spec.app_range[1], spec.name
    with pytest.raises(UserError, match="temperature must be between 0 and 2 .got 3."):
        app_values(cls, {"temperature": 3})
    with pytest.raises(UserError, match="^seed must be between 0 and 2147483647"):
        app_values(cls, {"seed": "2147483648"})
    assert check(cls(temperature=3, seed=2**40)).temperature == 3  # the library and the command line take them
    assert app_values(cls, {"seed": "", "temperature": "0.5"}) == {"seed": None, "temperature": 0.5}


@dataclass
class Sized:
    steps: int | str = setting(help="steps", low=1, high=1000, label="Steps", form=True, by_device={"cpu": 30, "cuda": 500})
    recompute: bool | str = setting(help="recompute", by_device={"cpu": False, "cuda": True})


def test_a_setting_sized_to_the_device_is_auto_until_the_device_is_known():
    """A LoRA run's defaults were Phi-2's GPU recipe: 500 steps of 2 minutes each on a CPU."""
    text = " ".join(parser_for(Sized).format_help().split())
    assert "steps; auto: 30 on a CPU, 500 on a GPU (default: auto) [a whole number from 1 to 1000 or 'auto']" in text
    assert "recompute; auto: off on a CPU, on on a GPU (default: auto)" in text and "--no-recompute" in text
    assert spec_of(Sized, "steps").allowed().endswith("or 'auto'") and spec_of(Sized, "recompute").default == "auto"
    for argv, given in (([], {}), (["--steps", "7", "--recompute"], {"steps": 7, "recompute": True}),
                        (["--no-recompute"], {"recompute": False})):
        cfg = from_args(Sized, parser_for(Sized).parse_args(argv))
        assert to_argv(cfg) == argv  # auto is the default: the command line leaves it out
        resolve_by_device(cfg, "cpu")
        assert cfg == Sized(**({"steps": 30, "recompute": False} | given))  # a flag given wins
    cfg = Sized()
    assert resolve_by_device(cfg, "cuda") == {"steps": 500, "recompute": True} and cfg == Sized(500, True)
    cfg = Sized()
    assert resolve_by_device(cfg, "cpu", saved={"steps": 12}) == {"steps": 12, "recompute": False}  # --resume
    assert parse(spec_of(Sized, "recompute"), " Auto ") == "auto" and parse(spec_of(Sized, "steps"), "auto") == "auto"


def test_the_lora_recipe_is_sized_for_a_cpu_and_stays_phi_2_s_on_a_gpu():
    on = {device: resolve_by_device(QLoRAConfig(out="x"), device) for device in ("cpu", "cuda")}
    assert on["cuda"] == dict(max_steps=500, max_seq_len=512, batch_size=4, grad_accum=4, max_eval_examples=200,
                              gradient_checkpointing=True)
    assert on["cpu"] == dict(max_steps=30, max_seq_len=256, batch_size=4, grad_accum=1, max_eval_examples=16,
                             gradient_checkpointing=False)
    text = " ".join(parser_for(QLoRAConfig).format_help().split())
    assert "optimizer steps; auto: 30 on a CPU, 500 on a GPU (default: auto)" in text
    cfg = QLoRAConfig(out="x", max_steps=2)
    resolve_by_device(cfg, "cpu")
    assert cfg.max_steps == 2 and cfg.max_seq_len == 256  # an explicit value wins
