"""LlamaBoard (`llamafactory-cli webui`): the OGPSA stages and their settings in the Train tab.

Applied by the activation hook when LLaMA-Factory imports `llamafactory.webui.components.train`
and `llamafactory.webui.runner`, both before the page is built. Nothing of LlamaBoard is copied;
its own tables, functions and methods are extended:

- `TRAINING_STAGES` (label -> stage, read by the stage dropdown, the dataset filter and the runner)
  gets one label per OGPSA stage, and `STAGES_USE_PAIR_DATA` gets `ogpsa_dpo`, so the dataset list
  offers preference datasets for it, as for `dpo`. Both are LLaMA-Factory's own objects, changed
  in place, because its webui modules imported them by name.
- `create_train_tab` also builds an "OGPSA configurations" accordion, shown only while an OGPSA
  stage is selected, with one widget per `ogpsa_*` field of `OGPSAArguments` (`widget_specs`: a
  dropdown for a `Literal`, a number for an int or float, a checkbox for a bool, a text box for a
  string), so a new setting appears on the page without editing it. LlamaBoard wires Preview,
  Start, Save and Load to the set that `manager.get_base_elems()` returns at the top of the tab;
  for that one call the widgets are added to it, so they travel with every other field (and are
  saved and loaded with them). Their label (the YAML key) and info (the field's help) go into
  LlamaBoard's `LOCALES`, which relabels the page in each of its languages; the help exists in
  English only, so every language shows it.
- `Runner._parse_train_args` builds the arguments of the OGPSA stage as those of its stock stage
  (so the stage's own fields, e.g. DPO's beta, ftx and loss, come along), then names the OGPSA stage
  and adds each widget that differs from its field's default. The extra-arguments box (a JSON dict)
  still works and has the last word on a key set in both places, as it has over every page field.
- `Runner._initialize` (LlamaBoard's check before preview, start and save) also runs the checks of
  `llamafactory-cli train`, so a bad `ogpsa_*` value shows its one-line error on the page and nothing
  starts. The launched `llamafactory-cli train` checks again (exit code 2), as for any YAML.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from typing import Any, Literal

from ...plugin.osf_settings import OSFArguments
from ...plugin.preflight import preflight
from ...plugin.settings import METHOD_KEYS, OGPSA_STAGES, PREFIX, OGPSAArguments, OGPSAConfigError, user_fields

# Labels in LlamaBoard's stage dropdown; the stock ones are "Supervised Fine-Tuning" and "DPO".
STAGE_LABELS = {"OGPSA Supervised Fine-Tuning": "ogpsa_sft", "OGPSA DPO": "ogpsa_dpo"}
ACCORDION = "ogpsa_tab"  # the accordion's name in LlamaBoard's manager ("train.ogpsa_tab") and LOCALES
ROW_WIDTH = 4  # widgets side by side at most; each help text is a few lines under its widget
_PATCHED = "__ogpsa_patched__"


# ---- the widgets, from the settings' dataclass ----


@dataclasses.dataclass(frozen=True)
class WidgetSpec:
    """One `ogpsa_*` field as a LlamaBoard widget: kind is dropdown, number, checkbox or text."""

    key: str
    kind: str
    default: Any
    help: str
    choices: tuple = ()
    integer: bool = False  # a number widget for an int field (precision 0)

    def value(self, shown: Any) -> Any:
        """The setting a widget showing `shown` gives the run; None when it gives nothing (left at the
        field's default, or emptied), so an untouched accordion adds no key to the run."""
        if isinstance(shown, str):
            shown = shown.strip()
        if shown is None or shown == "":  # an emptied box: as if never touched
            return None
        if self.kind == "number":
            if isinstance(shown, float) and self.integer and shown.is_integer():
                shown = int(shown)  # the browser's number box may hand back 3.0 for 3
            if self.default is not None and math.isclose(shown, self.default, rel_tol=1e-12, abs_tol=0.0):
                return None
        return None if shown == self.default else shown


def setting_fields() -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of every setting a page shows: the user fields of `OGPSAArguments`, then those of
    `OSFArguments` (the `ogpsa_osf_*` keys of `ogpsa_method: osf`), each dataclass in its own order."""
    ours, osf = typing.get_type_hints(OGPSAArguments), typing.get_type_hints(OSFArguments)
    return [(f, ours[f.name]) for f in user_fields()] + [(f, osf[f.name]) for f in dataclasses.fields(OSFArguments)]


def widget_specs() -> list[WidgetSpec]:
    """One widget per setting (`setting_fields`), in that order."""
    specs = []
    for f, hint in setting_fields():
        inner = tuple(a for a in typing.get_args(hint) if a is not type(None))
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            # Optional[X]: the widget of X, empty; int or float (a count or a fraction): a number
            hint = float if set(inner) == {int, float} else inner[0]
        help_text = " ".join(f.metadata.get("help", "").split())
        default = "" if f.default is dataclasses.MISSING else f.default  # a mapping: JSON text, empty = unset
        common = {"key": f.name, "default": default, "help": help_text}
        if typing.get_origin(hint) is Literal:
            specs.append(WidgetSpec(kind="dropdown", choices=typing.get_args(hint), **common))
        elif hint is bool:
            specs.append(WidgetSpec(kind="checkbox", **common))
        elif hint in (int, float):
            specs.append(WidgetSpec(kind="number", integer=hint is int, **common))
        elif hint is str or hint is dict:  # a mapping is typed as JSON text, as on a command line
            specs.append(WidgetSpec(kind="text", **common))
        else:  # a field type the page cannot show: found by the test of this list, not by a user
            raise TypeError(f"{f.name}: no LlamaBoard widget for {hint!r}")
    return specs


def _widget(spec: WidgetSpec):
    """The unrendered Gradio component of one setting (rendered later, inside the accordion)."""
    import gradio as gr

    common = {"label": spec.key, "info": spec.help, "render": False}
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=spec.default, **common)
    if spec.kind == "number":  # an Optional field starts empty: it sets nothing until given a value
        return gr.Number(value=spec.default, precision=0 if spec.integer else None, placeholder="unset", **common)
    return gr.Textbox(value=spec.default, **common)


def _rows(specs: list[WidgetSpec]) -> list[list[WidgetSpec]]:
    """The settings both methods read first, then each method's own (METHOD_KEYS), each group split
    into rows of at most ROW_WIDTH, as even as possible."""
    owner = {key: method for method, keys in METHOD_KEYS.items() for key in keys}
    owner.update({f.name: "osf" for f in dataclasses.fields(OSFArguments)})
    groups: dict[str, list[WidgetSpec]] = {}
    for spec in specs:
        groups.setdefault(owner.get(spec.key, ""), []).append(spec)
    rows = []
    for group in groups.values():
        count = -(-len(group) // ROW_WIDTH)
        size = -(-len(group) // count)
        rows += [group[i : i + size] for i in range(0, len(group), size)]
    return rows


def register_locales(locales: dict) -> None:
    """Labels of the accordion and its widgets in each of LlamaBoard's languages (those of its GaLore
    accordion): the accordion's title is GaLore's with the name swapped; the widgets show their key
    and their help, which is English only."""
    languages = locales["galore_tab"]
    title = {lang: {"label": entry["label"].replace("GaLore", "OGPSA")} for lang, entry in languages.items()}
    locales[ACCORDION] = {lang: entry if "OGPSA" in entry["label"] else title["en"] for lang, entry in title.items()}
    for spec in widget_specs():
        locales[spec.key] = {lang: {"label": spec.key, "info": spec.help} for lang in languages}


def patch_train_tab(train_module) -> None:
    """Wrap `create_train_tab` of `llamafactory.webui.components.train` (idempotent). The hook patches
    it right after the module runs, before `components` and `interface` import the name."""
    original = train_module.create_train_tab
    if getattr(original, _PATCHED, False):
        return
    from llamafactory.webui import locales

    register_locales(locales.LOCALES)

    def create_train_tab(engine):
        import gradio as gr

        specs = widget_specs()
        widgets = {spec.key: _widget(spec) for spec in specs}
        manager, base_elems = engine.manager, engine.manager.get_base_elems
        # the tab wires Preview, Start, Save and Load to the set this returns (its `input_elems`)
        manager.get_base_elems = lambda: base_elems() | set(widgets.values())
        try:
            elems = original(engine)
        finally:
            del manager.get_base_elems  # the instance attribute: the class's method again
        with gr.Accordion(label=locales.LOCALES[ACCORDION]["en"]["label"], open=False, visible=False) as tab:
            for row in _rows(specs):
                with gr.Row():
                    for spec in row:
                        widgets[spec.key].render()
        _place_after_last_accordion(tab)
        elems["training_stage"].change(
            lambda label: gr.Accordion(visible=label in STAGE_LABELS), [elems["training_stage"]], [tab], queue=False
        )
        return {**elems, ACCORDION: tab, **widgets}

    create_train_tab.__doc__ = original.__doc__
    setattr(create_train_tab, _PATCHED, True)
    train_module.create_train_tab = create_train_tab
    # armed late (the module was imported before the hook): the modules that took the name already
    for name in ("llamafactory.webui.components", "llamafactory.webui.interface"):
        module = sys.modules.get(name)
        if getattr(module, "create_train_tab", None) is original:
            module.create_train_tab = create_train_tab


def _place_after_last_accordion(tab) -> None:
    """Move the accordion (built after the whole tab) next to the stock ones (GaLore, BAdam, SwanLab),
    above the buttons; it stays at the tab's end if the tab has no accordion of its own."""
    import gradio as gr

    siblings = tab.parent.children
    stock = [i for i, block in enumerate(siblings) if isinstance(block, gr.Accordion) and block is not tab]
    if stock:
        siblings.remove(tab)
        siblings.insert(stock[-1] + 1, tab)


def page_settings(manager, data: dict) -> dict[str, Any]:
    """The `ogpsa_*` settings the accordion gives: its widgets that differ from their field's default."""
    settings = {}
    for spec in widget_specs():
        try:
            elem = manager.get_elem_by_id(f"train.{spec.key}")
        except KeyError:  # the accordion was not built (its patch failed): the JSON box only
            continue
        value = spec.value(data.get(elem))
        if value is not None:
            settings[spec.key] = value
    return settings


# ---- the runner ----


def patch_runner(runner_module) -> None:
    """Register the stages and wrap the Runner of `llamafactory.webui.runner` (idempotent)."""
    runner = runner_module.Runner
    if getattr(runner, _PATCHED, False):
        return
    parse, initialize = _wrap_parse_train_args(runner._parse_train_args), _wrap_initialize(runner._initialize)
    runner._parse_train_args, runner._initialize = parse, initialize
    register_stages()  # last: if anything above fails, the page keeps its stock stage list only
    setattr(runner, _PATCHED, True)


def register_stages() -> None:
    from llamafactory.extras import constants

    constants.TRAINING_STAGES.update(STAGE_LABELS)
    paired = [stage for stage, stock in OGPSA_STAGES.items() if stock in constants.STAGES_USE_PAIR_DATA]
    constants.STAGES_USE_PAIR_DATA.update(paired)  # ogpsa_dpo: preference datasets, as for dpo


def _stock_label(stock_stage: str) -> str:
    from llamafactory.extras.constants import TRAINING_STAGES

    return next(label for label, stage in TRAINING_STAGES.items() if stage == stock_stage)


def _wrap_parse_train_args(original):
    def _parse_train_args(self, data: dict) -> dict[str, Any]:
        stage_elem = self.manager.get_elem_by_id("train.training_stage")
        stage = STAGE_LABELS.get(data[stage_elem])
        if stage is None:
            return original(self, data)  # the accordion is hidden, and its widgets are ignored
        stock = OGPSA_STAGES[stage]
        args = original(self, {**data, stage_elem: _stock_label(stock)})
        if args.get("stage") == stock:  # else the extra-arguments box named a stage: it has the last word
            args["stage"] = stage
        if args["stage"] in OGPSA_STAGES:
            boxed = json.loads(data[self.manager.get_elem_by_id("train.extra_args")])
            args.update({k: v for k, v in page_settings(self.manager, data).items() if k not in boxed})
        # LlamaBoard leaves every False out of the command and of training_args.yaml (so the field's
        # default, true, would apply): a false setting goes as the text the command line would give
        return {k: "false" if k.startswith(PREFIX) and v is False else v for k, v in args.items()}

    _parse_train_args.__doc__ = original.__doc__
    return _parse_train_args


def _wrap_initialize(original):
    def _initialize(self, data: dict, do_train: bool, from_preview: bool) -> str:
        error = original(self, data, do_train, from_preview)
        return error or (ogpsa_error(self, data) if do_train else "")

    _initialize.__doc__ = original.__doc__
    return _initialize


def ogpsa_error(runner, data: dict) -> str:
    """The OGPSA error of the page's training arguments as one line, or "" when they are fine."""
    try:
        args = runner._parse_train_args(data)
    except Exception:  # noqa: BLE001 - a malformed stock field (learning rate "abc"): LlamaBoard reports it
        return ""
    try:
        preflight(args)
    except OGPSAConfigError as e:
        return f"ogpsa: error: {e}"
    return ""
