"""Each option declared once: a stage's Params field is a CLI option and an api keyword,
with the same default, and a new field appears in all three with no other edit."""
import inspect
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from castlib import api, options
from castlib.cli import _parser
from castlib.stages import stage_class, stage_names
from castlib.stages.base import StageParams
from tests.helpers import REPO_ROOT, cli_env


def _subparser(parser, command, positional):
    parser.parse_args([command, *positional])   # adds the command's stage options
    return next(a for a in parser._actions if a.dest == "command").choices[command]


def _other_value(o: options.Option):
    """A valid value for the option that is not its default."""
    if o.kind == "bool":
        return not o.default
    if o.kind == "list":
        return [o.choices[0]] if o.choices else ["*.tmp", "run*/**"]
    if o.choices:
        return next(c for c in o.choices if c != o.default)
    if o.kind == "str":
        return "some/thing"
    base = o.default if o.default is not None else (o.ge or 0)
    for value in (base + 1, base - 1, o.ge, o.le, 1, 2):
        if value is not None and value != o.default and (o.ge is None or value >= o.ge) \
                and (o.gt is None or value > o.gt) and (o.le is None or value <= o.le):
            return (int if o.kind == "int" else float)(value)
    raise AssertionError(f"no value for {o.name}")


def _cli_words(o: options.Option, value) -> list[str]:
    if o.kind == "bool":
        return [o.flag if value else "--no-" + o.flag[2:]]
    if o.kind == "list":
        return [w for item in value for w in (o.flag, str(item))]
    return [o.flag, str(value)]


@pytest.mark.parametrize("stage", stage_names())
def test_every_stage_parameter_reaches_the_cli_and_the_api_with_its_default(stage):
    cls = stage_class(stage)
    fields = cls.Params.model_fields
    assert all(f.description for f in fields.values()), \
        f"{stage}: a parameter without a description has no help in the CLI or `castlib stages`"
    commands = [c for c, spec in options.COMMANDS.items() if stage in spec.stages]
    if not commands:
        # a stage only pipelines run (report, http-push): its keys are its Params,
        # nothing to derive
        assert stage in ("report", "http-push"), f"stage {stage} is run by no command"
        return
    wiring = set(StageParams.model_fields) | set(cls.reads_results) | set(cls.location_params)
    reached = set()
    for command in commands:
        spec = options.COMMANDS[command]
        parser = _parser()
        positional = ["ref-x", "dst-x"][:len(spec.positional)]
        defaults = vars(parser.parse_args([command, *positional]))
        sub = _subparser(parser, command, positional)
        signature = inspect.signature(getattr(api, command)).parameters
        for name in spec.positional:
            assert signature[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        for o in options.command_options(command):
            if stage not in o.stages:
                continue
            first = o.stages[0]   # the stage whose default the option has
            if first == stage:
                model_default = fields[o.name].get_default(call_default_factory=True)
                assert defaults[o.name] == model_default, (command, o.name)
                assert signature[o.name].default == model_default, (command, o.name)
            # reachable: a value other than the default gets through the CLI and the API
            value = _other_value(o)
            cls.Params.model_validate({**_required(cls), o.name: value})
            parsed = vars(parser.parse_args([command, *positional, *_cli_words(o, value)]))
            assert parsed[o.name] == value, (command, o.name)
            assert api._for_stage(api._bind(command, {o.name: value})[0], command,
                                  stage)[o.name] == value
            assert any(o.flag in a.option_strings for a in sub._actions)
            reached.add(o.name)
    unreached = set(fields) - wiring - reached
    assert not unreached, f"{stage}: {unreached} are in no command's options"


def _required(cls) -> dict:
    return {n: "x" for n, f in cls.Params.model_fields.items() if f.is_required()
            and n != "from_"} | ({"from": "x"} if "from_" in cls.Params.model_fields else {})


def test_the_api_signature_and_help_show_every_option():
    params = inspect.signature(api.sync).parameters
    assert list(params)[:3] == ["ref", "dst", "db"] and params["transfers"].default is None
    assert params["index"].default == "both" and params["perms"].default is True
    import pydoc

    text = pydoc.render_doc(api.sync, renderer=pydoc.plaintext)
    assert "transfers: int | None = None" in text
    assert "transfers = None: files copied in parallel (default: 8 to or from SFTP" in text
    assert "prefix: str = ''" in pydoc.render_doc(api.verify, renderer=pydoc.plaintext)


def test_a_wrong_keyword_is_one_line_naming_it():
    with pytest.raises(TypeError) as info:
        api.sync("a", "b", transfer=8)
    assert str(info.value) == ("sync() got an unexpected keyword argument 'transfer' "
                               "(did you mean 'transfers'?)")
    from castlib.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        api.sync("a", "b", index="sometimes")
    assert str(info.value) == "index: must be both, ref or none, not 'sometimes'"


def test_a_repeated_list_option_replaces_its_default():
    args = _parser().parse_args(["diff", "a", "b", "--kinds", "missing", "--kinds", "extra"])
    assert args.kinds == ["missing", "extra"]
    assert _parser().parse_args(["diff", "a", "b"]).kinds == list(
        stage_class("diff").Params.model_fields["kinds"].get_default(call_default_factory=True))


def test_help_imports_neither_pydantic_nor_the_stages(tmp_path):
    """`castlib --help` and `castlib sync --help` read the options from the cache."""
    env = cli_env({"XDG_CACHE_HOME": str(tmp_path / "cache")})
    probe = ("import sys, contextlib, io\n"
             "from castlib import cli\n"
             "for argv in (['--help'], ['sync', '--help']):\n"
             "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
             "        try: cli.main(argv)\n"
             "        except SystemExit: pass\n"
             "    assert '--transfers' in out.getvalue() or argv == ['--help']\n"
             "print(sorted(m for m in sys.modules if m.startswith(('pydantic', "
             "'castlib.stages', 'sqlalchemy'))))\n")
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                           text=True, check=True)
    assert "pydantic" in first.stdout   # no cache yet: derived from the models, then kept
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                            text=True, check=True)
    assert second.stdout.strip() == "[]", second.stdout


def test_a_new_stage_parameter_appears_in_cli_api_and_pipeline_with_no_other_edit(tmp_path):
    """Copy castlib, add one field to SyncParams, and nothing else: the option is in
    `castlib sync --help` (the cached tables noticed the change), in api.sync's signature,
    and in a pipeline; a command-line value of it reaches the stage."""
    copy = tmp_path / "src"
    shutil.copytree(os.path.join(REPO_ROOT, "castlib"), copy / "castlib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = cli_env({"XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(copy)})

    def castlib(*args):
        return subprocess.run([sys.executable, "-m", "castlib", *args], env=env,
                              capture_output=True, text=True, cwd=str(copy))

    assert "--bandwidth-limit" not in castlib("sync", "--help").stdout   # cached now
    sync_py = copy / "castlib" / "stages" / "sync.py"
    text = sync_py.read_text()
    anchor = "    class SyncParams(StageParams):\n"   # in stages/sync.py's _params()
    assert anchor in text
    sync_py.write_text(text.replace(anchor, anchor + (
        '        bandwidth_limit: int = Field(0, ge=0, description="bytes per second, 0: none")\n')))
    help_text = castlib("sync", "--help").stdout
    assert "--bandwidth-limit N" in help_text and "bytes per second, 0: none" in help_text
    r = castlib("sync", "a", "b", "--bandwidth-limit", "-1")
    assert r.returncode == 2 and "argument --bandwidth-limit: must be 0 or more, not -1" in r.stderr
    probe = textwrap.dedent("""
        import inspect
        import castlib
        from castlib.pipeline import Pipeline
        assert inspect.signature(castlib.sync).parameters["bandwidth_limit"].default == 0
        p = Pipeline.from_yaml("stages:\\n  - diff: {id: d, ref: /a, dst: /b}\\n"
                               "  - sync: {from: d, bandwidth_limit: 5}\\n")
        assert p.stages[1].params.bandwidth_limit == 5
        import castlib.api as api
        p = api._for_stage(api._bind("sync", {"bandwidth_limit": 7})[0], "sync", "sync")
        assert p["bandwidth_limit"] == 7
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                       cwd=str(copy))
    assert r.stdout.strip() == "ok", r.stderr


def test_an_unwritable_cache_costs_time_not_correctness(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would be")
    r = subprocess.run([sys.executable, "-m", "castlib", "sync", "--help"],
                       env=cli_env({"XDG_CACHE_HOME": str(blocker)}), capture_output=True,
                       text=True)
    assert r.returncode == 0 and "--transfers N" in r.stdout and not r.stderr


@pytest.mark.parametrize("content", ["not json at all", '{"key": 1}', '{"commands": []}', "[]"])
def test_a_damaged_cache_is_derived_again(tmp_path, content):
    cache = tmp_path / "cache" / "castlib"
    cache.mkdir(parents=True)
    env = cli_env({"XDG_CACHE_HOME": str(tmp_path / "cache")})
    subprocess.run([sys.executable, "-m", "castlib", "sync", "--help"], env=env, check=True,
                   capture_output=True)
    (kept,) = cache.iterdir()
    kept.write_text(content)
    r = subprocess.run([sys.executable, "-m", "castlib", "sync", "--help"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--transfers N" in r.stdout and not r.stderr
    assert '"transfers"' in kept.read_text()


# -- stages' parameters checked without pydantic (stages.base.lean_params) ----------------------

LEAN_CASES = [
    ("index", {"location": "/data"}),
    ("index", {"location": "/d", "checksum": "adler32", "only": ["*.dat"], "ignore": [],
               "rehash": True, "workers": 8, "force": False, "max_vanish": 25,
               "missing_ok": True}),
    ("diff", {"id": "plan", "ref": "/a", "dst": "/b", "checksum": "md5", "mtime_tolerance": 2,
              "kinds": ["missing", "extra"], "only": None, "ignore": ["x/"], "perms": False}),
    ("sync", {"from": "plan"}),
    ("sync", {"from": "plan", "transfers": 16, "max_delete": 3, "lock_wait": 0.5,
              "stage_timeout": 10, "dry_run": True, "hard_links": True}),
    ("verify", {"location": "/d", "prefix": "sub", "workers": 1, "checksum": "sha256"}),
]


@pytest.mark.parametrize("stage,params", LEAN_CASES)
def test_lean_parameters_are_what_the_model_makes(stage, params):
    from castlib.stages.base import lean_params

    model = stage_class(stage).Params.model_validate(params)
    lean = lean_params(stage, params)
    assert lean is not None
    for name in type(model).model_fields:
        assert getattr(lean, name) == getattr(model, name), name
        assert type(getattr(lean, name)) is type(getattr(model, name)), name
    dump = {"mode": "json", "by_alias": True, "exclude_defaults": True}
    assert lean.model_dump(**dump) == model.model_dump(**dump)


@pytest.mark.parametrize("stage,params", [
    ("index", {"location": "/d", "workers": "8"}),       # the model reads it as 8
    ("index", {"location": "/d", "workers": 0}),         # below its bound: the model's words
    ("index", {"location": "/d", "workers": True}),
    ("index", {"location": "/d", "max_vanish": float("nan")}),
    ("index", {"location": "/d", "checksum": "crc32"}),
    ("index", {"location": "/d", "only": ("*.dat",)}),
    ("index", {"location": "/d", "colour": "blue"}),
    ("index", {}),                                        # a required parameter missing
    ("diff", {"ref": "/a", "dst": "/b", "kinds": ["missing", "sideways"]}),
    ("sync", {"from": "plan", "from_": "plan"}),
    ("sync", {"from": "plan", "stage_timeout": 0}),
])
def test_values_the_lean_check_does_not_take_are_left_to_the_model(stage, params):
    from castlib.stages.base import lean_params

    assert lean_params(stage, params) is None


def test_the_api_gives_the_models_answer_for_what_the_lean_check_leaves(tmp_path):
    from castlib.errors import ConfigError

    (tmp_path / "d").mkdir()
    db = str(tmp_path / "c.sqlite")
    report = api.index(str(tmp_path / "d"), db=db, workers="8")   # lax: the model's reading
    assert report.stages[0].spec.params.workers == 8
    with pytest.raises(ConfigError) as info:
        api.index(str(tmp_path / "d"), db=db, workers=0)
    assert str(info.value) == "workers: Input should be greater than or equal to 1"
    plain = api.index(str(tmp_path / "d"), db=db, workers=2)
    assert type(plain.stages[0].spec.params).__name__ == "LeanParams"
