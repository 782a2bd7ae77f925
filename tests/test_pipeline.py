"""YAML pipelines: a full run end to end, and bad pipelines refused with one precise line."""
import json
import os
import textwrap

import pytest

from tests.helpers import make_tree, run_cli, tree_digest


def write(tmp_path, text: str):
    p = tmp_path / "pipeline.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_pipeline_indexes_diffs_syncs_and_reports(tmp_path, db_url):
    daq = make_tree(tmp_path / "daq", {"run1/a.dat": b"a", "run1/b.tmp": b"t", "c.dat": b"c"})
    archive = tmp_path / "archive"
    p = write(tmp_path, f"""
        locations:
          daq: {daq}
          archive: file://{archive}
        stages:
          - index: {{location: daq, checksum: adler32, ignore: ["*.tmp"]}}
          - index: {{location: archive, missing_ok: true}}
          - diff:  {{id: pending, ref: daq, dst: archive}}
          - report: {{from: pending, format: json, out: pending.json}}
          - sync:  {{from: pending, transfers: 2}}
          - index: {{location: archive}}
          - diff:  {{id: after, ref: daq, dst: archive}}
          - report: {{from: after, format: csv, out: after.csv}}
        """)
    run_cli("run", str(p), db=db_url, check=0)
    report = json.loads((tmp_path / "pending.json").read_text())
    assert {d["path"] for d in report["differences"]} == {"run1", "run1/a.dat", "c.dat"}
    assert report["counts"]["missing"] == 3
    assert (tmp_path / "after.csv").read_text().splitlines() == [
        "path,kind,ref_type,ref_size,ref_mtime_ns,ref_checksum,ref_mode,dst_type,dst_size,"
        "dst_mtime_ns,dst_checksum,dst_mode,ref_corrupted,dst_corrupted"]
    assert not (archive / "run1" / "b.tmp").exists()
    assert (archive / "run1" / "a.dat").read_bytes() == b"a"
    runs = run_cli("runs", db=db_url, check=0).stdout
    assert " run " in runs and " ok " in runs
    names = run_cli("locations", db=db_url, check=0).stdout
    assert " daq " in names and " archive " in names


def test_dry_run_of_a_pipeline_touches_no_storage(tmp_path, db_url):
    daq = make_tree(tmp_path / "daq", {"a.dat": b"a"})
    p = write(tmp_path, f"""
        locations: {{daq: {daq}, archive: {tmp_path / 'archive'}}}
        stages:
          - index: {{location: daq}}
          - index: {{location: archive, missing_ok: true}}
          - diff: {{id: d, ref: daq, dst: archive}}
          - sync: {{from: d}}
        """)
    out = run_cli("run", str(p), "--dry-run", db=db_url, check=0)
    assert "would copy a.dat" in out.stdout
    assert not (tmp_path / "archive").exists()


BAD = {
    "malformed": ("stages:\n  - index: {location: daq\n", r"pipeline.yaml:\d+: malformed YAML"),
    "not a mapping": ("- index: {}\n", "pipeline.yaml:1: a pipeline is a mapping"),
    "unknown top key": ("locations: {}\nstage: []\n", "pipeline.yaml:2: stage: unknown key"),
    "no stages": ("locations: {daq: /tmp}\n", "stages: expected a non-empty list"),
    "unknown stage": ("locations: {daq: /tmp}\nstages:\n  - index: {location: daq}\n"
                      "  - frobnicate: {}\n",
                      r"pipeline.yaml:4: stages\[1\]: unknown stage 'frobnicate'"),
    "unknown parameter": ("locations: {daq: /tmp}\nstages:\n  - index:\n      location: daq\n"
                          "      chksum: adler32\n",
                          r"pipeline.yaml:5: stages\[0\].index.chksum: unknown parameter"),
    "wrong type": ("locations: {a: /tmp, b: /var}\nstages:\n  - diff: {id: d, ref: a, dst: b}\n"
                   "  - sync:\n      from: d\n      transfers: many\n",
                   r"pipeline.yaml:6: stages\[1\].sync.transfers: .*integer"),
    "bad checksum": ("locations: {a: /tmp}\nstages:\n  - index: {location: a, checksum: crc}\n",
                     r"pipeline.yaml:3: stages\[0\].index.checksum: Input should be"),
    "missing parameter": ("locations: {a: /tmp}\nstages:\n  - diff: {ref: a}\n",
                          r"pipeline.yaml:3: stages\[0\].diff.dst: required parameter"),
    "unknown location": ("locations: {daq: /tmp}\nstages:\n  - index: {location: daqq}\n",
                         r"pipeline.yaml:3: stages\[0\].index.location: unknown location 'daqq'"),
    "bad location url": ("locations:\n  daq: /tmp\n  eos: 'root:///nohost'\nstages:\n"
                         "  - index: {location: daq}\n",
                         r"pipeline.yaml:3: locations.eos: location .* has no host"),
    "unknown from": ("locations: {a: /tmp}\nstages:\n  - report: {from: nothing}\n",
                     r"pipeline.yaml:3: stages\[0\].report.from: no earlier stage has id"),
    "duplicate id": ("locations: {a: /tmp, b: /var}\nstages:\n  - diff: {id: d, ref: a, dst: b}\n"
                     "  - diff: {id: d, ref: b, dst: a}\n",
                     r"pipeline.yaml:4: stages\[1\].diff.id: duplicate id 'd'"),
    "stage not a mapping": ("stages:\n  - index\n", r"pipeline.yaml:2: stages\[0\]: each stage"),
    "from the wrong stage": ("locations: {a: /tmp}\nstages:\n  - index: {id: i, location: a}\n"
                             "  - sync: {from: i}\n",
                             r"pipeline.yaml:4: stages\[1\].sync.from: stage 'i' is an index: "
                             "sync reads the result of a diff"),
    "complex key": ("locations: {a: /tmp}\n? [a]\n: 1\nstages: []\n",
                    r"pipeline.yaml:2: a key must be a plain name"),
    "duplicate key": ("locations: {a: /tmp, b: /var}\nstages:\n  - index:\n      location: a\n"
                      "      location: b\n",
                      r"pipeline.yaml:5: stages.0.index.location: duplicate key 'location'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pipelines_give_one_line_with_file_line_and_key(tmp_path, db_url, case):
    text, pattern = BAD[case]
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    result = run_cli("run", str(p), db=db_url, check=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert lines[0].startswith("castlib: error: ")


def _laughs(levels: int = 9) -> str:
    """A "billion laughs": each level lists the one before nine times (9**levels laughs)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + f"\nstages: [*l{levels - 1}]\n"


def _merge_laughs(levels: int = 25) -> str:
    """The same through merge keys, which the loader flattens into every mapping."""
    lines = ["m0: &m0 {k: lol}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}], k{i}: lol}}")
    return "\n".join(lines) + f"\nstages: [*m{levels - 1}]\n"


HOSTILE_YAML = {
    "billion laughs": (_laughs(), r"pipeline.yaml:\d+: refused YAML: aliases expand .* more than"),
    "merge-key laughs": (_merge_laughs(), r"pipeline.yaml:\d+: refused YAML: aliases expand"),
    "recursive list": ("stages: &s [*s]\n",
                       r"pipeline.yaml:1: refused YAML: alias \*s is inside the node it names"),
    "recursive mapping": ("locations: &l {a: *l}\nstages: []\n",
                          r"pipeline.yaml:1: refused YAML: alias \*l is inside"),
    "deep lists": ("stages: " + "[" * 200_000 + "]" * 200_000 + "\n",
                   r"pipeline.yaml:1: refused YAML: nested more than \d+ levels deep"),
    "deep flow mappings": ("stages: " + "{a: " * 200_000 + "1" + "}" * 200_000 + "\n",
                           r"pipeline.yaml:1: refused YAML: nested more than \d+ levels deep"),
    "deep mappings": ("stages:\n" + "".join("  " * i + f"- k{i}:\n" for i in range(2000)),
                      r"pipeline.yaml:\d+: refused YAML: nested more than \d+ levels deep"),
}


@pytest.mark.parametrize("case", list(HOSTILE_YAML))
def test_yaml_bombs_and_deep_nesting_are_refused_at_once(tmp_path, case):
    """Refused while composing, before any Python object is built: no MemoryError after
    gigabytes, no RecursionError; one line, in well under a second."""
    import re
    import time

    from castlib.errors import ConfigError
    from castlib.pipeline import Pipeline

    text, pattern = HOSTILE_YAML[case]
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        Pipeline.from_file(str(p))
    assert time.monotonic() - started < 0.5
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.parametrize("case", ["billion laughs", "recursive list", "deep lists"])
def test_yaml_bombs_exit_2_with_one_line(tmp_path, case):
    text, pattern = HOSTILE_YAML[case]
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    result = run_cli("run", str(p), db=f"sqlite:///{tmp_path / 'c.sqlite'}", check=2, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("castlib: error: "), result.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_anchors_and_merge_keys_within_bounds_still_work(tmp_path):
    from castlib.pipeline import Pipeline

    p = tmp_path / "pipeline.yaml"
    p.write_text("locations: {a: /tmp, b: /var}\n"
                 "stages:\n"
                 "  - diff: &plan {id: d, ref: a, dst: b}\n"
                 "  - sync: {from: d, <<: &opts {transfers: 2, retries: 1}}\n"
                 "  - diff: {<<: *plan, id: e}\n"
                 "  - sync: {from: e, <<: *opts}\n")
    pipeline = Pipeline.from_file(str(p))
    assert [s.params.id for s in pipeline.stages] == ["d", None, "e", None]
    assert pipeline.stages[3].params.transfers == 2 and pipeline.stages[2].params.ref == "a"


def test_missing_pipeline_file(tmp_path, db_url):
    result = run_cli("run", str(tmp_path / "nope.yaml"), db=db_url, check=2)
    assert "nope.yaml: cannot read pipeline: No such file or directory" in result.stderr


def test_credentials_in_a_comment_of_a_pipeline_are_not_kept(tmp_path, db_url):
    from castlib.catalog import Catalog

    daq = make_tree(tmp_path / "daq", {"a.dat": b"a"})
    p = write(tmp_path, f"""
        # was: sftp://na64:Top@Secret5@daq.example/data
        locations: {{daq: "{daq}"}}
        stages:
          - index: {{location: daq}}
        """)
    run_cli("run", str(p), db=db_url, check=0)
    catalog = Catalog(db_url)
    try:
        run, _ = catalog.run_details(1)
    finally:
        catalog.close()
    assert "# was: sftp://***@daq.example/data" in run["pipeline"]
    assert "Secret5" not in run["pipeline"]


def test_credentials_never_reach_the_run_history(tmp_path, db_url):
    """Neither a pipeline's location options nor a URL's user:password@ is kept in the
    catalog's run records (runs.args, runs.pipeline, stage_results.params/errors)."""
    from sqlalchemy import create_engine, text

    from castlib.catalog.database import normalise_db_url

    daq = make_tree(tmp_path / "daq", {"a.dat": b"a"})
    p = write(tmp_path, f"""
        locations:
          daq: "{daq}"
          # named, not used: its options are checked by its back-end only when it is
          vault: {{url: "sftp://na64@127.0.0.1:9/x", options: {{password: TopSecret1, token: TopSecret2}}}}
        stages:
          - index: {{location: daq}}
        """)
    run_cli("run", str(p), db=db_url, check=0)
    # a URL with credentials, to a server that is not there: the run is recorded all the same
    r = run_cli("index", "sftp://na64:TopSecret3@127.0.0.1:9/data", db=db_url)
    assert r.returncode == 2 and "TopSecret3" not in r.stderr
    shown = run_cli("runs", "show", "2", db=db_url, check=0).stdout
    assert "sftp://***@127.0.0.1:9/data" in shown

    engine = create_engine(normalise_db_url(db_url))
    try:
        with engine.connect() as conn:
            stored = " ".join(str(row) for table in ("runs", "stage_results")
                              for row in conn.execute(text(f"SELECT * FROM {table}")))
    finally:
        engine.dispose()
    assert "TopSecret" not in stored
    assert "credentials removed by castlib" in stored and "index" in stored


def test_a_missing_reference_listed_with_missing_ok_is_refused_not_taken_as_empty(
        tmp_path, db_url):
    # missing_ok is for a destination not created yet: on the reference it must not turn
    # an unmounted or mistyped folder into "delete everything on the destination"
    archive = make_tree(tmp_path / "dst", {f"f{i:02}.dat": b"x" * i for i in range(20)})
    before = tree_digest(archive)
    p = write(tmp_path, f"""
        locations:
          daq2: {tmp_path / 'ref2'}
          archive: {archive}
        stages:
          - index: {{location: daq2, missing_ok: true}}
          - index: {{location: archive}}
          - diff: {{id: d, ref: daq2, dst: archive}}
          - sync: {{from: d, delete: true}}
        """)
    r = run_cli("run", str(p), db=db_url, check=2)
    refusal = [line for line in r.stderr.splitlines() if "does not exist" in line]
    assert len(refusal) == 1 and "ref2" in refusal[0], r.stderr
    assert "Traceback" not in r.stderr
    assert tree_digest(archive) == before


def test_a_reference_never_indexed_is_refused_under_index_none(tmp_path, db_url):
    archive = make_tree(tmp_path / "dst", {"a.dat": b"a", "b.dat": b"b"})
    run_cli("index", str(archive), db=db_url, check=0)
    (tmp_path / "ref").mkdir()
    r = run_cli("sync", str(tmp_path / "ref"), str(archive), "--delete", "--index", "none",
                db=db_url, check=2)
    assert "never indexed" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(archive)) == ["a.dat", "b.dat"]


def test_top_level_keys_read_through_the_model(tmp_path):
    """Names YAML reads as numbers stay names; an empty `locations:` is none; a location
    with options keeps them."""
    from castlib.pipeline import Pipeline

    p = write(tmp_path, """
        name: 2024
        description: nightly
        locations:
          2017: /tmp
          eos: {url: "root://eos.example.org//eos/x", options: {timeout: 30}}
        stages:
          - index: {location: "2017"}
          - index: {location: eos}
        """)
    pipeline = Pipeline.from_file(str(p))
    assert pipeline.locations == {"2017": "/tmp", "eos": "root://eos.example.org//eos/x"}
    assert pipeline.location_options == {"eos": {"timeout": 30}}
    p = write(tmp_path, "locations:\nstages:\n  - index: {location: /tmp}\n")
    assert Pipeline.from_file(str(p)).locations == {}
