"""LlamaBoard's OGPSA accordion without a browser: LlamaBoard's own Train tab built in this process
(as `llamafactory.webui.interface` builds it), its widgets checked against `OGPSAArguments`, and the
runner's arguments read from page values. The browser test (tests/test_webui.py) clicks the same
widgets in Chromium."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from ogpsa.pipelines.integration.webui import ACCORDION, STAGE_LABELS, widget_specs
from ogpsa.plugin.settings import OGPSAArguments, user_fields

gr = pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """(engine, Blocks) of LlamaBoard's top bar and Train tab; LlamaBoard writes its cache into the cwd."""
    from llamafactory.webui.components import create_top, create_train_tab
    from llamafactory.webui.engine import Engine

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("llamaboard"))
        engine = Engine()
        with gr.Blocks() as demo:
            engine.manager.add_elems("top", create_top())
            with gr.Tab("Train"):
                engine.manager.add_elems("train", create_train_tab(engine))
        yield engine, demo


def test_widgets_are_the_settings(board):
    """One widget per ogpsa_* field, of the field's kind, with its choices and default, labelled with the
    key and the field's help in every language of LlamaBoard; all wired to Preview, Start, Save, Load."""
    from llamafactory.webui.locales import LOCALES

    engine, demo = board
    from ogpsa.plugin.osf_settings import OSFArguments

    fields = user_fields() + list(dataclasses.fields(OSFArguments))  # the ogpsa_osf_* keys of ogpsa_method: osf
    assert [s.key for s in widget_specs()] == [f.name for f in fields] and len(fields) >= 18
    hints = {**typing.get_type_hints(OGPSAArguments), **typing.get_type_hints(OSFArguments)}
    languages = set(LOCALES["galore_tab"])
    assert {"en", "zh"} <= languages
    for f in fields:
        elem = engine.manager.get_elem_by_id(f"train.{f.name}")
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if typing.get_origin(hint) is typing.Literal:
            assert isinstance(elem, gr.Dropdown) and [c[1] for c in elem.choices] == list(typing.get_args(hint))
        elif hint is bool:
            assert isinstance(elem, gr.Checkbox)
        elif set(inner) == {int, float}:  # a count or a fraction
            assert isinstance(elem, gr.Number) and elem.precision is None, f.name
        elif inner[0] in (int, float):
            assert isinstance(elem, gr.Number) and elem.precision == (0 if inner[0] is int else None), f.name
        else:
            assert hint in (str, dict) and isinstance(elem, gr.Textbox), f.name
        default = "" if f.default is dataclasses.MISSING else f.default  # a mapping: JSON text, empty
        assert elem.value == default and elem.label == f.name
        assert " ".join(f.metadata["help"].split()) == elem.info
        assert set(LOCALES[f.name]) == languages and LOCALES[f.name]["en"] == {"label": f.name, "info": elem.info}
    tab = engine.manager.get_elem_by_id(f"train.{ACCORDION}")
    assert isinstance(tab, gr.Accordion) and tab.visible is False  # the first stage is a stock one
    assert LOCALES[ACCORDION]["en"]["label"] == "OGPSA configurations"
    assert LOCALES[ACCORDION]["zh"]["label"] == LOCALES["galore_tab"]["zh"]["label"].replace("GaLore", "OGPSA")
    # next to the stock accordions, above the buttons
    siblings = tab.parent.children
    assert siblings.index(engine.manager.get_elem_by_id("train.swanlab_tab")) + 1 == siblings.index(tab)
    widgets = {engine.manager.get_elem_by_id(f"train.{f.name}") for f in fields}
    wired = {fn.fn.__name__: fn for fn in demo.fns.values() if hasattr(fn.fn, "__name__")}
    for name in ("preview_train", "run_train", "save_args"):
        assert widgets <= set(wired[name].inputs), name
    assert widgets <= set(wired["load_args"].outputs)


def _data(engine, **fields) -> dict:
    """The page's values (each component's initial one) for an OGPSA SFT run, `fields` by element id."""
    data = {elem: getattr(elem, "value", None) for elem in engine.manager.get_elem_list()}
    page = {"top.model_name": "Custom", "top.model_path": "/models/tiny", "train.dataset": ["toy_safety_sft"],
            "train.output_dir": "run", "train.training_stage": "OGPSA Supervised Fine-Tuning", **fields}
    data.update({engine.manager.get_elem_by_id(key): value for key, value in page.items()})
    return data


def _ogpsa(args: dict) -> dict:
    return {k: v for k, v in args.items() if k.startswith("ogpsa_")}


def test_widget_values_reach_the_arguments(board):
    engine, _ = board
    parse = engine.runner._parse_train_args
    # untouched: nothing; the JSON box alone works as before
    assert _ogpsa(parse(_data(engine))) == {}
    box = {"optim": "adamw_torch", "ogpsa_refresh_steps": 7, "ogpsa_save_basis": False}
    assert _ogpsa(parse(_data(engine, **{"train.extra_args": json.dumps(box)}))) == {
        "ogpsa_refresh_steps": 7, "ogpsa_save_basis": "false"}  # false kept: LlamaBoard drops a False
    # widgets set; one at its default, one emptied; the JSON box has the last word on refresh steps
    widgets = {"train.ogpsa_reference": " a,b ", "train.ogpsa_refresh_steps": 3, "train.ogpsa_mode": "conflict",
               "train.ogpsa_keep_previous": False, "train.ogpsa_null_alpha": 5e-5, "train.ogpsa_null_layers": "",
               "train.ogpsa_reference_samples": 20.0, "train.ogpsa_null_energy": None}
    args = parse(_data(engine, **widgets))
    assert args["stage"] == "ogpsa_sft"
    assert _ogpsa(args) == {"ogpsa_reference": "a,b", "ogpsa_refresh_steps": 3, "ogpsa_mode": "conflict",
                            "ogpsa_keep_previous": "false", "ogpsa_reference_samples": 20}
    assert isinstance(args["ogpsa_reference_samples"], int)
    args = parse(_data(engine, **widgets, **{"train.extra_args": json.dumps(box)}))
    assert args["ogpsa_refresh_steps"] == 7 and args["ogpsa_mode"] == "conflict"
    # a stock stage: the accordion is hidden and its values are not used
    assert _ogpsa(parse(_data(engine, **widgets, **{"train.training_stage": "Supervised Fine-Tuning"}))) == {}
    assert parse(_data(engine, **{"train.training_stage": "OGPSA DPO"}))["stage"] == "ogpsa_dpo"
    offered = [label for label, _ in engine.manager.get_elem_by_id("train.training_stage").choices]
    assert set(STAGE_LABELS) <= set(offered)


def test_widget_error_is_one_line_on_the_page(board):
    """A bad widget value stops Preview/Start with the one-line error of `llamafactory-cli train`."""
    engine, _ = board
    data = _data(engine, **{"train.ogpsa_reference": "a", "train.ogpsa_directions_per_set": 0})
    error = engine.runner._initialize(data, do_train=True, from_preview=True)
    assert error == "ogpsa: error: ogpsa_directions_per_set: must be >= 1, got 0"
    data = _data(engine, **{"train.ogpsa_reference": "a", "train.ogpsa_method": "null_space",
                            "train.ogpsa_granularity": "global"})
    error = engine.runner._initialize(data, do_train=True, from_preview=True)
    assert error == "ogpsa: error: ogpsa_granularity: not used by ogpsa_method=null_space"


def test_every_field_type_has_a_widget():
    """A field of a type the page cannot show fails here, not on a user's page."""
    kinds = {s.key: s.kind for s in widget_specs()}
    assert kinds["ogpsa_method"] == "dropdown" and kinds["ogpsa_keep_previous"] == "checkbox"
    assert kinds["ogpsa_refresh_steps"] == "number" and kinds["ogpsa_reference"] == "text"
    from ogpsa.plugin.osf_settings import OSFArguments

    assert kinds["ogpsa_osf_effective_rank"] == "number" and kinds["ogpsa_osf_rank_pattern"] == "text"
    expected = [f.name for f in dataclasses.fields(OGPSAArguments) if f.name.startswith("ogpsa_")]
    assert set(expected + [f.name for f in dataclasses.fields(OSFArguments)]) == set(kinds)
