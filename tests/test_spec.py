"""Bad input: a clear error naming the file, the field path and what was expected; exit 2; nothing written."""

import json

import pytest
from click.testing import CliRunner
from conftest import update_edit

from kn_edit.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def good(model, world):
    return {"model": str(model), "edits": [update_edit(world, "capital", 0)]}


def test_valid_spec_passes(bert_dir, world, write_spec):
    r = run_cli("validate", write_spec(good(bert_dir, world)))
    assert r.exit_code == 0, r.output
    assert "ok (1 edits, 4 prompts" in r.output


@pytest.mark.parametrize(
    "mutate, where, expected",
    [
        (lambda s: s.update(colour="red"), "colour", "unknown key"),
        (lambda s: s["edits"][0]["update"].update(tempaltes=["x"]), "edits[0].update.tempaltes", "unknown key"),
        (lambda s: s.update(seed="zero"), "seed", "valid integer"),
        (lambda s: s.setdefault("method", {}).update(steps=0), "method.steps", "greater than or equal to 1"),
        (lambda s: s["edits"][0]["update"].update(templates=["the capital is [Y] ."]), "edits[0].update", "expected [X]"),
        (lambda s: s["edits"][0]["update"].update(templates=["the capital of [X] is ."]), "edits[0].update", "exactly one [Y]"),
        (lambda s: s["edits"][0]["update"].pop("target"), "edits[0].update.target", "required field is missing"),
        (lambda s: s.update(edits=[]), "edits", "at least 1 item"),
        (
            lambda s: s["edits"][0].update(
                erase={"relation": "x", "templates": ["[X] [Y]"], "facts": [{"subject": "a", "target": "b"}]}
            ),
            "edits[0]",
            "exactly one key",
        ),
    ],
)
def test_schema_errors(bert_dir, world, write_spec, tmp_path, mutate, where, expected):
    spec = good(bert_dir, world)
    mutate(spec)
    path = write_spec(spec)
    for args in (("validate", path), ("build", path, tmp_path / "out")):
        r = run_cli(*args)
        assert r.exit_code == 2, r.output
        assert f"{path}: {where}" in r.output and expected in r.output, r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_multi_token_targets_validate(kind, world, write_spec, tmp_path, request):
    spec = good(request.getfixturevalue(f"{kind}_dir"), world)
    spec["edits"][0]["update"]["new_target"] = "city3 lang5 city1"
    r = run_cli("validate", write_spec(spec))
    assert r.exit_code == 0, r.output
    assert "-> 'city3 lang5 city1' (3 tokens: ['city3', 'lang5', 'city1'])" in r.output
    spec["edits"][0]["update"]["new_target"] = "two words"
    path = write_spec(spec)
    r = run_cli("build", path, tmp_path / "out")
    assert r.exit_code == 2
    assert f"{path}: edits[0].update.new_target: 'two words' has a token unknown" in r.output
    assert not (tmp_path / "out").exists()


def test_causal_answer_must_end_prompt(llama_dir, world, write_spec, tmp_path):
    spec = good(llama_dir, world)
    spec["edits"][0]["update"]["templates"][1] = "[Y] is the capital of [X] ."
    path = write_spec(spec)
    r = run_cli("validate", path)
    assert r.exit_code == 2
    subject = world.facts["capital"][0][0]
    assert (
        f"{path}: edits[0].update.templates[1]: '[Y] is the capital of {subject} .': for a causal model [Y] must end" in r.output
    )


def test_yaml_syntax_error_names_line(write_spec):
    path = write_spec("model: x\nedits: [\n  - update: {\n")
    r = run_cli("validate", path)
    assert r.exit_code == 2
    assert f"{path}: line" in r.output and "not valid YAML" in r.output


def test_missing_model_folder(world, write_spec):
    spec = {"model": "./no/such/model", "edits": [update_edit(world, "capital", 0)]}
    r = run_cli("validate", write_spec(spec))
    assert r.exit_code == 2 and "model folder not found" in r.output


def test_schema_command_lists_fields():
    r = run_cli("schema")
    assert r.exit_code == 0
    schema = json.loads(r.output)
    assert schema["$schema"].startswith("https://json-schema.org/") and schema["$id"]
    for field in ("edits", "new_target", "min_facts", "gates"):
        assert field in r.output
    r = run_cli("schema", "--report")
    assert r.exit_code == 0 and "success_rate" in json.loads(r.output)["$defs"]["EditReport"]["properties"]


def test_method_nested_and_flat_forms_are_the_same():
    from kn_edit.spec import Method

    flat = Method.model_validate({"steps": 8, "update_rule": "plain", "erase_min_facts": 3, "norm_cap": None})
    nested = Method.model_validate(
        {"locate": {"steps": 8}, "update": {"rule": "plain", "norm_cap": None}, "erase": {"min_facts": 3}}
    )
    assert flat == nested and flat.locate.steps == 8 and flat.erase.min_facts == 3
    assert flat.locate.rule == "riemann"  # the paper's left Riemann sum unless asked
    assert Method.model_validate({"locate": {"rule": "gauss", "steps": 6}}).locate.rule == "gauss"
    assert flat.locate.batch == 1  # one prompt per pass unless asked
    assert flat.locate.layer_rules == {} and flat.locate.own_rules() == {}
    own = Method.model_validate({"locate": {"rule": "gauss", "steps": 6, "layer_rules": {"0": {"rule": "riemann", "steps": 20}}}})
    assert own.locate.own_rules() == {0: ("riemann", 20, None)}
    assert Method.model_validate({"locate": {"batch": 8}}).locate.batch == 8


@pytest.mark.parametrize(
    "method, where, expected",
    [
        ({"steps": 0}, "method.steps", "greater than or equal to 1"),  # the flat form: named as written
        ({"locate": {"steps": 0}}, "method.locate.steps", "greater than or equal to 1"),
        ({"steps": 4, "locate": {"steps": 8}}, "method.steps", "given twice"),
        ({"update": {"scale_max": float("inf")}}, "method.update.scale_max", "finite number"),
        ({"refine": {"sharing": 1}}, "method.refine.sharing", "unknown key"),
        ({"locate": {"rule": "simpson"}}, "method.locate.rule", "'riemann', 'midpoint', 'trapezoid', 'gauss' or 'lobatto'"),
        ({"locate": {"rule": "trapezoid", "steps": 1}}, "method.locate", "rule trapezoid needs steps >= 2"),
        ({"locate": {"batch": 0}}, "method.locate.batch", "greater than or equal to 1"),
        (
            {"locate": {"layer_rules": {-1: {"rule": "gauss", "steps": 4}}}},
            "method.locate.layer_rules[-1]",
            "greater than or equal to 0",
        ),
        ({"locate": {"layer_rules": {0: {"rule": "gauss"}}}}, "method.locate.layer_rules[0].steps", "required"),
        ({"locate": {"layer_rules": {0: {"rule": "trapezoid", "steps": 1}}}}, "method.locate.layer_rules[0]", "steps >= 2"),
        ({"locate": {"rule": "gauss", "like_riemann": 20}}, "method.locate", "like_riemann needs rule lobatto or trapezoid"),
        ({"locate": {"rule": "lobatto", "steps": 1}}, "method.locate", "rule lobatto needs steps >= 2"),
    ],
)
def test_method_errors_name_the_field_as_written(bert_dir, world, write_spec, method, where, expected):
    spec = good(bert_dir, world)
    spec["method"] = method
    path = write_spec(spec)
    r = run_cli("validate", path)
    assert r.exit_code == 2 and f"{path}: {where}: " in r.output and expected in r.output, r.output


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("new_target", "zorblax", "'zorblax' has a token unknown to this model's vocabulary (it tokenizes as ['[UNK]'])"),
        ("target", "zorblax", "'zorblax' has a token unknown to this model's vocabulary"),
        ("target", "city1 zorblax", "'city1 zorblax' has a token unknown"),  # several tokens: at target, not at templates[i]
        ("subject", "zorblax land", "'zorblax land' has words this model's vocabulary lacks"),
    ],
)
def test_unknown_or_split_words_name_their_field(bert_dir, world, write_spec, tmp_path, field, value, expected):
    spec = good(bert_dir, world)
    spec["edits"][0]["update"][field] = value
    path = write_spec(spec)
    for args in (("validate", path), ("build", path, tmp_path / "out", "--device", "cpu")):
        r = run_cli(*args)
        assert r.exit_code == 2, r.output
        assert f"{path}: edits[0].update.{field}: {expected}" in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
