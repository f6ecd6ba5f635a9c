"""Every declared bound of every settings dataclass (trainer, fid, eval, sample, benchmark, import) is enforced, at
its edge: a value just outside it is refused naming the key, the value and what is allowed, and a value exactly on
an inclusive bound is accepted.

The settings classes are found in the package's source, and their rules in their fields' metadata, so a new class
or field is covered the day it is added. The rules are also pinned in RULES below: a rule deleted from a field
takes its metadata with it, which a test derived from the metadata alone cannot notice.
"""

import ast
import dataclasses
import importlib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest

import ddpm
from ddpm.config.errors import ConfigError
from ddpm.config.validation import Validated, check_field

PACKAGE_DIR = Path(ddpm.__file__).resolve().parent
# What check_field reads in a field's metadata; a key outside these would be a rule that nothing here tests.
RULE_KEYS = {"minimum", "maximum", "interval", "choices"}
SEED_MAXIMUM = 2**32 - 1

# Every rule declared today, by config key. A field that gains or loses a rule fails
# test_the_declared_rules_are_the_pinned_ones until this table says the same.
RULES: dict[str, dict[str, Any]] = {
    "trainer.iterations": {"minimum": 1},
    "trainer.batch_size": {"minimum": 1},
    "trainer.loss_type": {"choices": ("l1", "l2")},
    "trainer.grad_clip": {"minimum": 0},
    "trainer.warmup": {"minimum": 0},
    "trainer.lr_decay": {"choices": ("constant", "cosine", "linear")},
    "trainer.log_rate": {"minimum": 0},
    "trainer.test_batches": {"minimum": 0},
    "trainer.sample_rate": {"minimum": 0},
    "trainer.checkpoint_rate": {"minimum": 0},
    "trainer.early_stop_loss_change": {"minimum": 0},
    "trainer.ema_decay": {"interval": (0, 1)},
    "trainer.ema_update_rate": {"minimum": 1},
    "trainer.ema_start": {"minimum": 0},
    "trainer.seed": {"minimum": 0, "maximum": SEED_MAXIMUM},
    "trainer.num_workers": {"minimum": 0},
    "trainer.num_threads": {"minimum": 1},
    "trainer.grid_columns": {"minimum": 1},
    "trainer.label_dropout": {"interval": (0, 1)},
    "trainer.eval_rate": {"minimum": 0},
    "trainer.eval_samples": {"minimum": 1},
    "trainer.eval_steps": {"minimum": 1},
    "trainer.eval_batch_size": {"minimum": 1},
    "trainer.nll_timesteps": {"minimum": 1},
    "trainer.objective": {"choices": ("auto", "test_loss", "train_loss", "best_fid", "nll_bits_per_dim")},
    "trainer.early_stop_metric": {"choices": ("train_loss", "fid")},
    "trainer.early_stop_patience": {"minimum": 1},
    "trainer.keep_checkpoints": {"minimum": 0},
    "trainer.skip_nonfinite": {"minimum": 0},
    "fid.batch_size": {"minimum": 1},
    "fid.reference_split": {"choices": ("train", "test")},
    "fid.reference_num_images": {"minimum": 2},
    "fid.reference_pr_images": {"minimum": 1},
    "eval.num_samples": {"minimum": 2},
    "eval.batch_size": {"minimum": 1},
    "eval.seed": {"minimum": 0, "maximum": SEED_MAXIMUM},
    "eval.is_splits": {"minimum": 1},
    "eval.pr_num_samples": {"minimum": 1},
    "eval.pr_k": {"minimum": 1},
    "eval.kid_subsets": {"minimum": 1},
    "eval.kid_subset_size": {"minimum": 2},
    "eval.num_shards": {"minimum": 1},
    "eval.nll_timesteps": {"minimum": 1},
    "eval.nll_num_images": {"minimum": 1},
    "sample.num_images": {"minimum": 1},
    "sample.batch_size": {"minimum": 1},
    "sample.seed": {"minimum": 0, "maximum": SEED_MAXIMUM},
    "sample.sequence_frames": {"minimum": 1},
    "benchmark.batch_size": {"minimum": 1},
    "benchmark.sample_batch_size": {"minimum": 1},
    "benchmark.warmup_steps": {"minimum": 0},
    "benchmark.warmup_seconds": {"minimum": 0},
    "benchmark.steps": {"minimum": 1},
    "benchmark.max_seconds": {"minimum": 0.001},
    "benchmark.data_batches": {"minimum": 1},
}
# The settings classes there are today; a class missing here fails the discovery test (its rules would go untested).
EXPECTED_CLASSES = {
    "ddpm.training.settings.TrainSettings",
    "ddpm.evaluation.settings.FidSettings",
    "ddpm.evaluation.settings.EvalSettings",
    "ddpm.tasks.sample.SampleSettings",
    "ddpm.tasks.benchmark.BenchmarkSettings",
    "ddpm.tasks.import_weights.ImportSettings",
}


def modules_defining_settings() -> list[str]:
    """The modules of the package whose source defines a class deriving from Validated (read, not imported, so
    that a class in a module nothing imports yet is found too)."""
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                (isinstance(base, ast.Name) and base.id == "Validated")
                or (isinstance(base, ast.Attribute) and base.attr == "Validated")
                for base in node.bases
            ):
                relative = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
                found.append(".".join(relative.parts))
                break
    return found


def settings_classes() -> list[type[Validated]]:
    """Every settings dataclass of the package: the modules that define one imported, then Validated's
    subclasses (and theirs) collected."""
    for module in modules_defining_settings():
        importlib.import_module(module)
    pending, found = list(Validated.__subclasses__()), []
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("ddpm.") and dataclasses.is_dataclass(cls) and cls not in found:
            found.append(cls)  # test modules may define their own subclasses: those are not settings
    return found


CLASSES = settings_classes()
BY_SECTION = {cls.SECTION: cls for cls in CLASSES}


def declared_rules() -> dict[str, dict[str, Any]]:
    """config key -> the rule its field's metadata declares (the note, which only explains a bound, left out)."""
    rules = {}
    for cls in CLASSES:
        for field in dataclasses.fields(cls):
            rule = {key: value for key, value in field.metadata.items() if key != "note"}
            if rule:
                rules[f"{cls.SECTION}.{field.name}"] = rule
    return rules


def number_type(cls: type, name: str) -> type:
    """The annotated type of a field, without its None (int | None -> int)."""
    annotation = typing.get_type_hints(cls)[name]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return annotation


def typed(kind: type, value: float) -> Any:
    return float(value) if kind is float else int(value)


def just_below(kind: type, bound: float) -> Any:
    """The value of the field's type closest to `bound` from below (the next float down, or the int before)."""
    return math.nextafter(float(bound), -math.inf) if kind is float else math.ceil(bound) - 1


def just_above(kind: type, bound: float) -> Any:
    return math.nextafter(float(bound), math.inf) if kind is float else math.floor(bound) + 1


@dataclasses.dataclass(frozen=True)
class Case:
    key: str  # SECTION.field
    name: str  # what the case tries, for the test id
    value: Any
    allowed: str = ""  # how the refusal states what is allowed; empty for a value that must be accepted

    @property
    def id(self) -> str:
        return f"{self.key}-{self.name}"


def cases() -> tuple[list[Case], list[Case]]:
    """(values to refuse, values to accept) at every bound of RULES and of the declared rules together: a
    pinned rule whose metadata is gone still gets its cases, and fails them."""
    refused, accepted = [], []
    declared = declared_rules()
    rules = {**RULES, **{key: rule for key, rule in declared.items() if key not in RULES}}
    for key, rule in rules.items():
        section, name = key.split(".", 1)
        cls = BY_SECTION.get(section)
        if cls is None or name not in {field.name for field in dataclasses.fields(cls)}:
            continue  # the pinning test names what is missing
        if "choices" in rule:
            choices = list(rule["choices"])
            refused.append(Case(key, "not-a-choice", "not-" + choices[0], f"is not one of {choices}"))
            accepted += [Case(key, f"choice-{choice}", choice) for choice in choices]
            continue
        kind = number_type(cls, name)
        if "minimum" in rule:
            low = rule["minimum"]
            refused.append(Case(key, "below-minimum", just_below(kind, low), f"must be >= {low}"))
            if typed(kind, low) == low:  # an int field's minimum of 0.5 has no value exactly on it
                accepted.append(Case(key, "at-minimum", typed(kind, low)))
        if "maximum" in rule:
            high = rule["maximum"]
            refused.append(Case(key, "above-maximum", just_above(kind, high), f"must be <= {high}"))
            if typed(kind, high) == high:
                accepted.append(Case(key, "at-maximum", typed(kind, high)))
        if "interval" in rule:
            low, high = rule["interval"]
            allowed = f"must be in [{low}, {high})"
            refused.append(Case(key, "below-interval", just_below(kind, low), allowed))
            refused.append(Case(key, "at-interval-high", typed(kind, high), allowed))  # the high end is open
            accepted.append(Case(key, "at-interval-low", typed(kind, low)))
            accepted.append(Case(key, "just-below-interval-high", just_below(kind, high)))
    return refused, accepted


REFUSED, ACCEPTED = cases()


def companions(key: str, value: Any) -> dict[str, Any]:
    """The other settings without which the class's own check() refuses `value` of `key` whatever its bounds: a
    value that only means something together with another setting gets that setting too."""
    if key == "trainer.objective" and value == "best_fid":
        return {"eval_rate": 1}  # the best FID during training needs FIDs during training
    if key == "trainer.objective" and value == "nll_bits_per_dim":
        return {"nll_at_end": True}  # the objective is the bound computed after the last step
    if key == "trainer.early_stop_metric" and value == "fid":
        return {"eval_rate": 1}  # stopping on the FID compares FIDs measured during training
    if key == "trainer.label_dropout" and value > 0:
        return {"use_labels": True}  # labels are dropped only where there are labels
    if key == "eval.num_samples" and isinstance(value, int):
        return {"is_splits": max(1, min(value, 10))}  # the Inception Score splits the samples into is_splits
    return {}


# Values on a declared bound that check() refuses whatever the other settings: (the most lenient other settings,
# what check() says). None now: eval.num_samples declares the minimum of 2 that check() needs.
REFUSED_BY_CHECK: dict = {}


def build(key: str, value: Any, **others: Any) -> Validated:
    """The key's settings class from its defaults, with `value` for the key."""
    section, name = key.split(".", 1)
    return BY_SECTION[section](**{**companions(key, value), **others, name: value})


def test_every_settings_class_of_the_package_is_found():
    found = {f"{cls.__module__}.{cls.__qualname__}" for cls in CLASSES}
    assert found == EXPECTED_CLASSES, "a settings class was added or removed: update EXPECTED_CLASSES (and RULES)"
    assert all(cls.SECTION for cls in CLASSES), "every settings class names its config section (SECTION)"
    assert len(BY_SECTION) == len(CLASSES), "two settings classes share a SECTION"


def test_every_rule_is_one_the_field_check_enforces():
    """A metadata key that check_field does not read would be a rule nobody enforces (and nothing here tests)."""
    for key, rule in declared_rules().items():
        assert set(rule) <= RULE_KEYS, f"{key} declares {sorted(set(rule) - RULE_KEYS)}, which check_field ignores"


def test_the_declared_rules_are_the_pinned_ones():
    """A bound deleted from a field (or one added) shows here, by key, whatever the cases below make of it."""
    declared = declared_rules()
    lost = {key: RULES[key] for key in RULES.keys() - declared.keys()}
    new = {key: declared[key] for key in declared.keys() - RULES.keys()}
    changed = {
        key: (RULES[key], declared[key]) for key in RULES.keys() & declared.keys() if RULES[key] != declared[key]
    }
    assert not lost, f"fields that no longer declare their rule: {lost}"
    assert not new, f"fields with a rule RULES does not pin yet (add them): {new}"
    assert not changed, f"rules that changed (pinned, declared): {changed}"


@pytest.mark.parametrize("case", REFUSED, ids=[case.id for case in REFUSED])
def test_a_value_just_outside_a_declared_bound_is_refused_naming_key_value_and_bound(case):
    with pytest.raises(ConfigError) as caught:
        build(case.key, case.value)
    message = str(caught.value)
    assert message.startswith(f"{case.key}={case.value!r} "), message
    assert case.allowed in message, f"{message!r} does not say what is allowed ({case.allowed})"


@pytest.mark.parametrize("case", ACCEPTED, ids=[case.id for case in ACCEPTED])
def test_a_value_on_an_inclusive_bound_is_accepted(case):
    section, name = case.key.split(".", 1)
    cls = BY_SECTION[section]
    if (case.key, case.value) in REFUSED_BY_CHECK:
        others, message = REFUSED_BY_CHECK[(case.key, case.value)]
        field = next(field for field in dataclasses.fields(cls) if field.name == name)
        check_field(case.key, case.value, typing.get_type_hints(cls)[name], {"note": "", **field.metadata})
        with pytest.raises(ConfigError, match=re.escape(message)):
            build(case.key, case.value, **others)
        return
    settings = build(case.key, case.value)
    assert getattr(settings, name) == case.value and type(getattr(settings, name)) is type(case.value)


def test_the_cases_reach_every_bound_of_every_rule():
    """Each pinned rule gets a refusal at each of its bounds (so no rule is skipped by the case builder)."""
    refused = {(case.key, case.name) for case in REFUSED}
    expected = {
        "minimum": ["below-minimum"],
        "maximum": ["above-maximum"],
        "interval": ["below-interval", "at-interval-high"],
        "choices": ["not-a-choice"],
    }
    for key, rule in RULES.items():
        for kind in rule:
            for name in expected[kind]:
                assert (key, name) in refused, f"no case {key}-{name}"
